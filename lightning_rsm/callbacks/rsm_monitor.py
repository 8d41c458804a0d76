"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor
from typing_extensions import override

from lightning_rsm.callbacks import background as bg
from lightning_rsm.callbacks import validation
from lightning_rsm.callbacks.batches import ForwardFn, LogitsFn, Picker
from lightning_rsm.callbacks.pipeline import EvaluationPipeline
from lightning_rsm.callbacks.probe import Probe, untouched
from lightning_rsm.callbacks.schedule import Schedule, check_score_readers
from lightning_rsm.callbacks.scoring import warm_start_caches
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS
from lightning_rsm.functional.representations import TokenGrid
from lightning_rsm.namespaces import CALLBACK_BASES, WarningCache, is_fitting

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl


class RSMMonitor(EvaluationPipeline, *CALLBACK_BASES):
    r"""Monitor semantic RSMs of chosen layers on a fixed probe set during training.

    On each evaluation (every ``every_n_epochs`` epochs: after the epoch's validation, or after
    the training epoch when no validation ran in it; or every ``every_n_train_steps`` optimizer
    steps, right after the step; never during the sanity check) the probe is run through the
    model in eval mode, without gradients, eagerly (also a ``torch.compile``'d model: nothing is
    compiled or recompiled for it) and with every RNG state restored, the outputs of ``layers``
    are captured with forward hooks, and per layer the semantic RSM (and the spatially aligned
    baseline) is computed and scored with :func:`~lightning_rsm.functional.rsm_scores`. Scalars
    go through ``pl_module.log``, so ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them
    (at fit start, one that would read an ``rsm/`` key at other times than it is logged is an
    error naming the setting that fixes it); with ``every_n_train_steps`` they also go straight
    to the loggers at ``trainer.global_step``, whatever ``log_every_n_steps`` is. Every logger
    also gets the heatmaps (samples sorted by label, a colour scale fixed for the run) and the
    layer x layer RSA matrix, written once by rank 0 (what each receives:
    :mod:`lightning_rsm.image_logging`). Under DDP the ranks share the RSMs' work; if any rank
    fails in an evaluation, every rank skips it with the same warning and training goes on.

    With ``background=True`` only the probe forward runs in the hook; the RSMs, scores and images
    are computed by a worker thread while training goes on, with the same numbers as
    ``background=False``, bit for bit, and the same guarantees. History rows, images and logger
    scalars carry the step at which the features were taken; scores reach ``pl_module.log`` at
    the first epoch end at which they are ready (usually one epoch late; the first evaluation
    when an ``rsm/`` key is monitored and the last one are waited for). The whole contract
    (checkpoints, exceptions, DDP, CUDA): :mod:`lightning_rsm.callbacks.background`.

    Logged scalars (``<layer>`` as in ``model.named_modules()``, ``<kind>`` is ``semantic`` or,
    with ``baseline=True``, ``baseline``; ``<score>`` a key of ``rsm_scores``: ``map``,
    ``precision@1``, ``recall@1`` with labels, ``f1@1`` with multi-hot labels,
    ``probability_agreement`` with logits):

    ===================================  =========================================================
    ``rsm/<layer>/<kind>/<score>``       the RSM's quality score
    ``rsm/<layer>/rsa_to_previous``      RSA of the semantic RSM with the previous evaluation's
                                         (1 = unchanged); from the second evaluation on
    ``rsm/<layer>/vs_<name>``            RSA of the semantic RSM with the target RSM ``<name>``
    ``rsm/time_s``                       seconds the evaluation took (in the background: the
                                         capture plus the worker's computation, not the wait)
    ===================================  =========================================================

    Images: ``rsm/<layer>/<kind>/heatmap`` and ``rsm/layer_rsa`` (layers in the order given).

    Args:
        probe: the probe set, fixed for the run: a ``DataLoader`` or ``Dataset`` yielding tensors,
            ``(inputs, labels)`` tuples or (with ``input_fn``) any batch, or the whole probe as
            one such batch; read once, at fit start. Class ids ``(N,)`` (integer) or multi-hot
            labels ``(N, L)`` enable the retrieval scores. None: ``probe_size`` samples of the
            fit's validation data (its first val loader, else ``datamodule.val_dataloader()``),
            class-balanced, chosen with a fixed seed (see
            :func:`~lightning_rsm.callbacks.probe_selection.select_probe`), read once when
            training starts; the same in every run and after a resume.
        layers: module names as in ``model.named_modules()`` (inside a ``torch.compile``'d
            module also without ``_orig_mod.``); outputs of shape ``(N, C, H, W)``,
            ``(N, T, D)`` or ``(N, D)`` (tuple outputs: their first tensor).
        every_n_epochs: evaluate after every n-th epoch (the default, 1, unless
            ``every_n_train_steps`` is given).
        every_n_train_steps: evaluate after every n-th optimizer step instead (mid-epoch), in
            ``on_train_batch_end``; not together with ``every_n_epochs``.
        probe_size: samples taken from the validation data when ``probe`` is None.
        input_fn: what the model is fed from a probe batch: a key (dict batches), an index
            (tuple batches) or a function of the batch, giving a tensor ``(B, ...)`` or a
            dict/tuple of such tensors. Default: the batch, or the first of one or two tensors.
        label_fn: the labels of a probe batch, picked the same way. Default: the second tensor
            of an ``(inputs, labels)`` pair, else none.
        forward_fn: ``forward_fn(model, inputs)`` runs the model on a probe batch's inputs;
            default ``model(**inputs)`` for a dict, else ``model(inputs)``.
        special_tokens: for token layers ``(N, T, D)``: how many leading tokens are special
            (CLS, registers); pooling never mixes them with the patch tokens.
        tokens: for token layers: keep ``"all"`` tokens, only the ``"patches"`` or only the
            ``"special"`` ones.
        token_grid: for token layers with more patch tokens than ``max_positions``: ``"auto"``
            pools them as a square grid when their number is a square (a ViT's 14 x 14),
            ``(h, w)`` as that grid, ``None`` along T. Pooled token layers are named in a
            warning, once.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: LAP solver, as in :func:`~lightning_rsm.functional.semantic_rsm`.
        sigma: RBF bandwidth; default the median heuristic of each evaluation.
        window: window size of ``matcher="windowed"``.
        tol: certified cosine-scale tolerance of ``matcher="auction"``.
        baseline: also compute the spatially aligned baseline RSM and its scores.
        max_positions: cap on the positions (``H * W`` or ``T``) per sample; larger maps are
            average-pooled first (see :mod:`lightning_rsm.functional.options`; special tokens
            kept with ``tokens="all"`` come on top). ``None`` keeps every position (exact for
            the layer, slow for large maps).
        batch_size: probe samples per forward pass.
        logits_fn: maps the model's forward output on a probe batch to logits ``(B, K)``; by
            default the output (its first tensor) when it has that shape, else the probability
            agreement is skipped with one warning.
        targets: reference RSMs ``(N, N)`` over the same probe, by name.
        method: how RSMs are compared (drift, layer x layer, targets): ``"cka"``,
            ``"kendall"``, ``"pearson"`` or ``"spearman"``.
        log_images: send heatmaps to the Trainer's loggers.
        heatmap_range: fixed ``(vmin, vmax)`` of the heatmaps; by default
            :func:`~lightning_rsm.plotting.default_colour_range` of the first evaluation.
        background: compute the RSMs, scores and images on a worker thread while training
            goes on (see above).
        num_workers: solver threads of :func:`~lightning_rsm.functional.semantic_rsm`. Default
            every core when synchronous, 1 with ``background=True`` (the worker takes one core
            from training; raise it where cores are idle, e.g. beside a GPU); always 1 for a
            torch matcher on CUDA in the background.
        warm_start_bytes: memory for keeping each pair's last exact solution (assignment and
            duals, ``S * 9 + 1`` bytes a pair) so that later evaluations start from it: the same
            RSMs, 3x to 5x cheaper once training settles (``benchmarks/README.md``). Shared
            equally by the layers; pairs beyond it are solved cold; 0 turns it off. Only
            ``matcher="exact"``; not stored in checkpoints (the first evaluation after a
            resume is cold).

    Attributes:
        history: one dict per evaluation: ``epoch``, ``step`` (where its features were taken)
            and the logged scalars, in the order of the evaluations.
        layer_rsa: the last evaluation's layer x layer RSA matrix ``(L, L)``.

    Raises:
        MisconfigurationException: If an option has a value that is not allowed; at fit start,
            if a layer is not a module of the model, a ``ModelCheckpoint`` or ``EarlyStopping``
            monitors an ``rsm/`` key at other times than it is logged (with ``background=True``
            and ``every_n_train_steps``: at all), or ``probe`` is None and the fit has no
            validation data.
        TypeError: If ``probe``, ``targets``, ``logits_fn``, ``input_fn``, ``label_fn`` or
            ``forward_fn`` have the wrong type, a probe batch has a structure they do not
            pick from (the message names it), or labels are not integer class ids or multi-hot
            values (at construction for tensors, at fit start for loaders).
        RuntimeError: At fit start, if the model fails on a probe batch (the message says how it
            was called and names ``forward_fn``).
        ValueError: If the probe or a target has a bad shape (at construction for tensors, at
            fit start for loaders), or, at fit start, a layer's output is not a representation.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_rsm.demo import DigitsCNN
        >>> x, y = torch.rand(20, 1, 32, 32), torch.arange(20) % 5
        >>> monitor = RSMMonitor((x[:10], y[:10]), ["block2", "block3"])
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> trainer.fit(DigitsCNN(width=4), DataLoader(TensorDataset(x, y), batch_size=10))
        >>> [row["epoch"] for row in monitor.history]
        [0, 1]
        >>> for name in sorted(monitor.history[1]):
        ...     if name.startswith("rsm/block3/semantic"):
        ...         print(name)
        rsm/block3/semantic/map
        rsm/block3/semantic/precision@1
        rsm/block3/semantic/probability_agreement
        rsm/block3/semantic/recall@1
    """

    def __init__(
        self,
        probe: Probe | None = None,
        layers: Sequence[str] = (),
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        probe_size: int = 500,
        input_fn: Picker | None = None,
        label_fn: Picker | None = None,
        forward_fn: ForwardFn | None = None,
        special_tokens: int = 0,
        tokens: str = "all",
        token_grid: TokenGrid = "auto",
        kernel: str = "cosine",
        matcher: str = "exact",
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        baseline: bool = True,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        batch_size: int = 256,
        logits_fn: LogitsFn | None = None,
        targets: Mapping[str, Tensor] | None = None,
        method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
        background: bool = False,
        num_workers: int | None = None,
        warm_start_bytes: int = 2**28,
    ) -> None:
        validation.check_layers(layers)
        self._schedule = Schedule.from_options(every_n_epochs, every_n_train_steps)
        validation.check_batch_options(input_fn, label_fn, forward_fn, probe_size)
        validation.check_token_options(special_tokens, tokens, token_grid)
        validation.check_options(
            kernel=kernel,
            matcher=matcher,
            sigma=sigma,
            window=window,
            tol=tol,
            max_positions=max_positions,
            batch_size=batch_size,
            method=method,
        )
        validation.check_background(background, num_workers)
        validation.check_warm_start_bytes(warm_start_bytes)
        self.heatmap_range = validation.check_heatmap_range(heatmap_range)
        validation.check_logits_fn(logits_fn)
        validation.check_probe(probe, input_fn, label_fn)
        self.targets = validation.check_targets(targets)

        self.probe = probe
        self.layers = list(layers)
        self.every_n_epochs, self.every_n_train_steps = self._schedule
        self.probe_size = probe_size
        self.input_fn, self.label_fn, self.forward_fn = input_fn, label_fn, forward_fn
        self.special_tokens, self.tokens, self.token_grid = special_tokens, tokens, token_grid
        self.kernel = kernel
        self.matcher = matcher
        self.sigma = sigma
        self.window = window
        self.tol = tol
        self.baseline = baseline
        self.max_positions = max_positions
        self.batch_size = batch_size
        self.logits_fn = logits_fn
        self.method = method
        self.log_images = log_images
        self.background = background
        self.num_workers = num_workers
        self.warm_start_bytes = warm_start_bytes

        self.history: list[dict[str, float]] = []
        self.layer_rsa: Tensor | None = None
        self._last_epoch = -1
        self._last_step = -1
        self._previous: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._inputs: Any = None  # a tensor (N, ...), or a dict/tuple of them
        self._labels: Tensor | None = None
        self._use_logits = True
        self._warnings = WarningCache()
        self._background: bg.Background | None = None
        self._trainer: pl.Trainer | None = None  # while a background worker runs: checkpoints
        self._solver_threads = num_workers
        self._caches = warm_start_caches(self.layers, matcher, warm_start_bytes)
        self._unlogged: dict[str, float] | None = None  # scores not yet given to pl_module.log
        self._to_recapture: list[dict[str, Any]] = []  # evaluations pending at the checkpoint

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=tuple(self.layers), kernel=self.kernel)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start_background(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:  # else from the validation data, once the fit has set it up
            self._prepare_probe(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_training(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._after_batch(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validation_ends_the_epoch(trainer):
            self._end_epoch(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deliver_finished(trainer, wait=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_background()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_background()

    @override
    def state_dict(self) -> dict[str, Any]:
        pending = self._settle_for_checkpoint()
        return {
            "history": [dict(row) for row in self.history],
            "last_epoch": self._last_epoch,
            "last_step": self._last_step,
            "previous": dict(self._previous),
            "ranges": {layer: list(r) for layer, r in self._ranges.items()},
            "pending": pending,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]
        self._last_epoch = state_dict["last_epoch"]
        self._last_step = state_dict.get("last_step", -1)
        self._previous = dict(state_dict["previous"])
        self._ranges = {layer: (r[0], r[1]) for layer, r in state_dict["ranges"].items()}
        self._to_recapture = [dict(p) for p in state_dict.get("pending", [])]

    # ------------------------------------------------------------------ evaluation

    def _start_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the callbacks that read the scores, read a probe from the validation data, and
        recompute what was pending when the resumed checkpoint was saved."""
        check_score_readers(self._schedule, trainer, self, background=self.background)
        if self.probe is None:
            self._prepare_probe(trainer, pl_module)
        self._recapture_pending(trainer, pl_module)

    def _after_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Deliver a finished background evaluation, evaluate if a step is due, and (per step)
        give the newest scores to ``pl_module.log``."""
        self._deliver_finished(trainer)
        self._evaluate_if_due(trainer, pl_module, after_step=True)
        if self._schedule.by_steps:
            self._log_scores(pl_module, on_step=True)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate if due, deliver a finished background evaluation (waited for when the fit
        ends or a monitored key is missing), then give the newest scores to ``pl_module.log``."""
        self._evaluate_if_due(trainer, pl_module)
        wait = bg.ends_fit(trainer) or bg.misses_monitored_key(trainer)
        self._deliver_finished(trainer, wait=wait)
        self._log_scores(pl_module, on_step=False)

    def _evaluate_if_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, after_step: bool = False
    ) -> None:
        last = {"last_epoch": self._last_epoch, "last_step": self._last_step}
        if not self._schedule.is_due(trainer, after_step=after_step, **last):
            return
        self._last_epoch, self._last_step = trainer.current_epoch, trainer.global_step
        self._deliver_finished(trainer, wait=True)  # at most one evaluation pending
        with untouched(pl_module):
            self._evaluate(trainer, pl_module)


def _validation_ends_the_epoch(trainer: pl.Trainer) -> bool:
    """A validation run at the end of a training epoch of ``fit`` (not the sanity check)."""
    return (
        not trainer.sanity_checking
        and is_fitting(trainer)
        and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    )
