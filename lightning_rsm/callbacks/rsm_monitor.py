"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_rsm import targets as references
from lightning_rsm.archive import ArchiveWriter, Ids
from lightning_rsm.callbacks import archiving, reporting, schedule
from lightning_rsm.callbacks import background as bg
from lightning_rsm.callbacks.batches import (
    ForwardFn,
    Picker,
    ReferenceNetwork,
    batch_length,
    slice_batch,
)
from lightning_rsm.callbacks.config import MonitorConfig, as_misconfiguration
from lightning_rsm.callbacks.evaluation import Evaluation, Evaluator, Outcome, warm_start_caches
from lightning_rsm.callbacks.probe import (
    Probe,
    capture_layers,
    check_layer_names,
    check_targets_match_probe,
    read_probe,
    untouched,
)
from lightning_rsm.callbacks.probe_selection import select_probe, validation_loader
from lightning_rsm.callbacks.ranks import is_distributed, run_on_every_rank
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS, TORCH_MATCHERS
from lightning_rsm.functional.representations import TokenGrid
from lightning_rsm.namespaces import CALLBACK_BASES, WarningCache, rank_zero_warn

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl


class RSMMonitor(*CALLBACK_BASES):
    r"""Monitor semantic RSMs of chosen layers on a fixed probe set during training.

    On each evaluation (every ``every_n_epochs`` epochs: after the epoch's validation, or after
    the training epoch when no validation ran in it; or every ``every_n_train_steps`` optimizer
    steps, right after the step; never during the sanity check) the probe is run through the
    model in eval mode, without gradients, eagerly (also a ``torch.compile``'d model: nothing is
    compiled or recompiled for it) and with every RNG state restored, the outputs of ``layers``
    are captured with forward hooks, and per layer the semantic RSM (and the spatially aligned
    baseline) is computed and scored with :func:`~lightning_rsm.functional.rsm_scores`. Under
    DDP the ranks share the RSMs' work; if any rank fails in an evaluation, every rank skips it
    with the same warning and training goes on.

    Where the results go (:mod:`lightning_rsm.callbacks.reporting`), at one step per evaluation:
    the step Lightning gives the epoch's other metrics (e.g. a ``val_loss`` logged in
    ``validation_step``), or with ``every_n_train_steps`` the ``trainer.global_step`` after the
    step; the scalars to every logger (``log_metrics``, whatever ``log_every_n_steps`` is), the
    heatmaps (samples sorted by label, a colour scale fixed for the run) and the layer x layer
    RSA to every logger that takes images (what each receives: :mod:`lightning_rsm.image_logging`),
    written once by rank 0. As ``LearningRateMonitor`` does, the latest scores stay in
    ``trainer.callback_metrics``, the same on every rank (no ``sync_dist`` needed, no warning
    under DDP), so ``ModelCheckpoint``, ``EarlyStopping`` or any callback monitoring an ``rsm/``
    key finds it from the first evaluation on, whatever its own schedule; before the first
    evaluation the key is missing (``ModelCheckpoint`` after a validation and a strict
    ``EarlyStopping`` then raise; otherwise they warn and skip), and between evaluations a
    reader sees the latest score again (an ``EarlyStopping`` counts that against its
    ``patience``), so give a reader the monitor's schedule (e.g. both ``every_n_epochs=2``).

    With ``background=True`` only the probe forward runs in the hook; the RSMs, scores and images
    are computed by a worker thread while training goes on, with the same numbers as
    ``background=False``, bit for bit, the same history and the same logger steps. The scores
    reach ``trainer.callback_metrics`` when the worker has finished (after a later batch or
    epoch end; the first evaluation when an ``rsm/`` key is monitored and the last one are
    waited for), so a reader sees them late. The whole contract (checkpoints, exceptions, DDP,
    CUDA): :mod:`lightning_rsm.callbacks.background`.

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
        targets: what each layer's semantic RSM is compared with (``rsm/<layer>/vs_<name>``),
            by name: a reference RSM ``(N, N)`` over the same probe (e.g. human similarity
            judgements), or a reference network (e.g. a teacher): ``(model, "layer4")`` with a
            name from ``model.named_modules()``, or a callable mapping a batch of probe inputs
            to features ``(B, ...)``. A network's semantic RSM is computed once, at fit start
            after the probe is read, with the monitor's options (kernel, matcher, pooling,
            tokens, ``forward_fn``, ``batch_size``; :func:`~lightning_rsm.targets.reference_rsm`),
            the network in eval mode without gradients and left as it was (under DDP: by rank
            0, then broadcast, so every rank compares with the same matrix).
        method: how RSMs are compared (drift, layer x layer, targets): ``"cka"``,
            ``"kendall"``, ``"pearson"`` or ``"spearman"``.
        log_images: send heatmaps to the Trainer's loggers.
        heatmap_range: fixed ``(vmin, vmax)`` of the heatmaps; by default
            :func:`~lightning_rsm.plotting.default_colour_range` of the first evaluation.
        background: compute the RSMs, scores and images on a worker thread while training
            goes on (see above).
        solver_threads: threads that solve the RSMs' assignment problems
            (:func:`~lightning_rsm.functional.semantic_rsm`), not DataLoader workers. Default
            every core when synchronous, 1 with ``background=True`` (the worker takes one core
            from training; raise it where cores are idle, e.g. beside a GPU); always 1 for a
            torch matcher on CUDA in the background.
        warm_start_bytes: memory for keeping each pair's last exact solution (assignment and
            duals, ``S * 9 + 1`` bytes a pair) so that later evaluations start from it: the same
            RSMs, 3x to 5x cheaper once training settles (``benchmarks/README.md``). Shared
            equally by the layers; pairs beyond it are solved cold; 0 turns it off. Only
            ``matcher="exact"``; not stored in checkpoints (the first evaluation after a
            resume is cold).
        save_rsms: keep every delivered evaluation's RSMs (every layer, semantic and baseline,
            as computed and scored) with its step and epoch (as in ``history``), the logits, the
            probe's labels, its fingerprint and ``probe_ids``: one file per evaluation,
            ``step=<step>.pt`` (:mod:`lightning_rsm.archive`; float32 upper triangles, read back
            bit for bit with :func:`~lightning_rsm.load_rsms`; ``2 N (N + 1)`` bytes per RSM), in
            ``<log_dir>/rsms/`` of the Trainer's first logger that has a ``log_dir``
            (TensorBoard, CSV), else ``<default_root_dir>/rsms/``. Written by global rank 0, on
            the training thread (also with ``background=True``). A resumed run adds to the same
            folder (give the logger a fixed ``version``) and rewrites, never duplicates, a step
            evaluated again; an archive of another probe in that folder is an error at fit
            start.
        save_every: with ``save_rsms``: keep every k-th evaluation's file (1: all; None: only the
            last ``save_last``).
        save_last: with ``save_rsms``: also keep the last m evaluations' files.
        probe_ids: with ``save_rsms``: an id per probe sample, in the probe's order (N str, e.g.
            file names, or N int, e.g. dataset indices), stored with the RSMs so that runs on the
            same samples, preprocessed differently, can be compared
            (:func:`~lightning_rsm.compare_runs`). Only with a given ``probe`` (samples chosen
            from the validation data have no ids you could give).

    Attributes:
        config: the options, checked (:class:`~lightning_rsm.callbacks.config.MonitorConfig`).
        layers: the monitored layers, in the order given.
        history: one dict per evaluation: ``epoch``, ``step`` (``trainer.global_step`` when its
            features were taken) and the logged scalars, in the order of the evaluations.
        layer_rsa: the last evaluation's layer x layer RSA matrix ``(L, L)``.

    Raises:
        MisconfigurationException: If an option has a value that is not allowed; at fit start,
            if a layer is not a module of the model, a callback monitors an ``rsm/`` key of
            ``every_n_train_steps`` with ``background=True`` (it would read an earlier step's
            score), ``probe`` is None and the fit has no validation data, or, with
            ``save_rsms``, the archive folder holds an archive of another probe.
        TypeError: If an option has the wrong type (e.g. ``baseline="no"``), a probe batch has a
            structure that ``input_fn`` and ``label_fn`` do not pick from (the message names
            it), or labels are not integer class ids or multi-hot values (at construction for
            tensors, at fit start for loaders).
        RuntimeError: At fit start, if the model fails on a probe batch (the message says how it
            was called and names ``forward_fn``).
        ValueError: If the probe or a target has a bad shape or values that are not finite (at
            construction for tensors, at fit start for loaders), or, at fit start, a layer's
            output is not a representation, a target network has no such layer or returns
            features of another N (the message names the target), or ``probe_ids`` has another
            length than the probe.

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
        logits_fn: Callable[[Any], Tensor] | None = None,
        targets: Mapping[str, ReferenceNetwork | Tensor] | None = None,
        method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
        background: bool = False,
        solver_threads: int | None = None,
        warm_start_bytes: int = 2**28,
        save_rsms: bool = False,
        save_every: int | None = 1,
        save_last: int = 1,
        probe_ids: Ids | None = None,
    ) -> None:
        options = {name: value for name, value in locals().items() if name != "self"}
        self.config = MonitorConfig(**options)  # every argument above, checked there
        self.history: list[dict[str, float]] = []
        self.layer_rsa: Tensor | None = None
        self._last_epoch = -1
        self._last_step = -1
        self._previous: dict[str, Tensor] = {}  # the last semantic RSMs, for rsa_to_previous
        self._ranges: dict[str, tuple[float, float]] = {}  # heatmap colour ranges, per layer
        self._inputs: Any = None  # a tensor (N, ...), or a dict/tuple of them
        self._labels: Tensor | None = None
        self._use_logits = True
        self._warnings = WarningCache()
        self._background: bg.Background | None = None
        self._trainer: pl.Trainer | None = None  # while a background worker runs: checkpoints
        self._solver_threads = self.config.solver_threads
        self._caches = warm_start_caches(
            self.config.layers, self.config.matcher, self.config.warm_start_bytes
        )
        self._to_recapture: list[dict[str, Any]] = []  # evaluations pending at the checkpoint
        self._targets: dict[str, Tensor] = {}  # every target's RSM (N, N), set at fit start
        self._archive: ArchiveWriter | None = None  # save_rsms=True, on rank 0, from fit start

    @property
    def layers(self) -> list[str]:
        """The monitored layers, in the order given."""
        return list(self.config.layers)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.config.layers, kernel=self.config.kernel)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._start_background(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.probe is not None:  # else from the validation data, once it is set up
            self._prepare_probe(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule.check_score_readers(self.config, trainer)
        if self.config.probe is None:
            self._prepare_probe(trainer, pl_module)
        self._recapture_pending(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._deliver_finished(trainer)
        self._evaluate_if_due(trainer, pl_module, after_step=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if schedule.validation_ends_the_epoch(trainer):
            self._end_epoch(trainer, pl_module, last_batch_counted=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, last_batch_counted=True)

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

    # ------------------------------------------------------------------ the probe

    def _prepare_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the probe, check it, the layers, the target RSMs and ids, find the logits, then
        (everything checked) compute the reference networks' RSMs and open the archive."""
        config = self.config
        with as_misconfiguration():
            check_layer_names(pl_module, config.layers)
        with untouched(pl_module):
            self._inputs, self._labels = self._read_probe(trainer)
        n = batch_length(self._inputs)
        given = {name: rsm for name, rsm in config.targets.items() if isinstance(rsm, Tensor)}
        check_targets_match_probe(given, n)
        archiving.check_ids_match_probe(config.probe_ids, n)
        if self._labels is None:
            self._warnings.warn("The probe has no labels: retrieval scores are not computed.")
        self._use_logits = self._finds_logits(trainer, pl_module)
        self._targets = self._target_rsms(trainer)
        self._archive = archiving.open_archive(trainer, config, self._inputs, self._labels)

    def _finds_logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether the model's output on two probe samples gives logits (a dry forward)."""
        self._use_logits = True
        with untouched(pl_module):
            _, logits = self._capture(trainer, pl_module, slice_batch(self._inputs, 0, 2))
        if logits is not None:
            return True
        if self.config.logits_fn is not None:
            raise ValueError(
                "Expected `logits_fn` to return logits of shape (B, K) with K >= 2 on a "
                "probe batch of B samples, but it did not."
            )
        self._warnings.warn(
            "The model's forward output on the probe is not a (B, K) logits tensor: the "
            "probability agreement is not computed. Pass `logits_fn` to pick the logits."
        )
        return False

    def _read_probe(self, trainer: pl.Trainer) -> tuple[Any, Tensor | None]:
        """The probe's inputs and labels: the one given, or chosen from the validation data."""
        c = self.config
        if c.probe is not None:
            return read_probe(c.probe, c.batch_size, c.input_fn, c.label_fn)
        loader = validation_loader(trainer)
        probe = select_probe(loader, c.probe_size, c.batch_size, c.input_fn, c.label_fn)
        return trainer.strategy.broadcast(probe, src=0) if is_distributed(trainer) else probe

    def _target_rsms(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        """Every target's RSM: a tensor as given; a reference network's computed now, on the
        probe with the monitor's settings (under DDP by rank 0, then broadcast)."""
        targets = self.config.targets
        networks = {name: net for name, net in targets.items() if not isinstance(net, Tensor)}
        if not networks:
            return dict(targets)
        if not is_distributed(trainer):
            computed = self._reference_rsms(networks)
        else:

            def on_rank_zero() -> dict[str, Tensor]:
                return self._reference_rsms(networks) if trainer.is_global_zero else {}

            computed, failure = run_on_every_rank(on_rank_zero, distributed=True)
            if failure is not None:
                raise ValueError(f"On rank {failure[0]}: {failure[1]}")
            computed = trainer.strategy.broadcast(computed, src=0)
        return {name: computed.get(name, target) for name, target in targets.items()}

    def _reference_rsms(self, networks: Mapping[str, ReferenceNetwork]) -> dict[str, Tensor]:
        """The semantic RSM of each reference network on the probe; errors name the target."""
        c, rsms = self.config, {}
        for name, network in networks.items():
            try:
                rsms[name] = references.reference_rsm(
                    network,
                    self._inputs,
                    kernel=c.kernel,
                    matcher=c.matcher,
                    sigma=c.sigma,
                    window=c.window,
                    tol=c.tol,
                    num_workers=self._solver_threads,
                    batch_size=c.batch_size,
                    max_positions=c.max_positions,
                    forward_fn=c.forward_fn,
                    special_tokens=c.special_tokens,
                    tokens=c.tokens,
                    token_grid=c.token_grid,
                )
            except (TypeError, ValueError) as error:
                raise type(error)(f"`targets[{name!r}]`: {error}") from error
        return rsms

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        c = self.config
        return capture_layers(
            pl_module,
            c.layers,
            inputs,
            batch_size=c.batch_size,
            max_positions=c.max_positions,
            logits_fn=c.logits_fn,
            want_logits=self._use_logits,
            forward_context=trainer.precision_plugin.forward_context,
            forward_fn=c.forward_fn,
            special_tokens=c.special_tokens,
            tokens=c.tokens,
            token_grid=c.token_grid,
            warn=lambda message: self._warnings.warn(f"RSMMonitor: {message}"),
        )

    # ------------------------------------------------------------------ one evaluation

    def _end_epoch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, last_batch_counted: bool
    ) -> None:
        """Evaluate if due, then deliver a finished background evaluation (waited for when the
        fit ends or a monitored ``rsm/`` key is missing)."""
        self._evaluate_if_due(trainer, pl_module, last_batch_counted=last_batch_counted)
        wait = schedule.ends_fit(trainer) or schedule.misses_monitored_key(trainer)
        self._deliver_finished(trainer, wait=wait)

    def _evaluate_if_due(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        after_step: bool = False,
        last_batch_counted: bool = True,
    ) -> None:
        """Capture the features here, in the training loop (they need the weights of this
        step); compute here or on the background worker."""
        last = {"last_epoch": self._last_epoch, "last_step": self._last_step}
        if not schedule.is_due(self.config, trainer, after_step=after_step, **last):
            return
        self._last_epoch, self._last_step = trainer.current_epoch, trainer.global_step
        self._deliver_finished(trainer, wait=True)  # at most one evaluation pending
        log_step = reporting.log_step(
            trainer, by_steps=self.config.by_steps, last_batch_counted=last_batch_counted
        )
        with untouched(pl_module):
            evaluation = self._capture_evaluation(trainer, pl_module, log_step)
            if evaluation is not None:
                self._hand_off(trainer, evaluation)

    def _capture_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_step: int
    ) -> Evaluation | None:
        """The probe's features now (rank 0's under DDP); None on every rank if one failed."""
        start = time.perf_counter()
        captured, failure = run_on_every_rank(
            lambda: self._capture(trainer, pl_module, self._inputs),
            distributed=is_distributed(trainer),
        )
        if failure is not None:
            self._warn_failed(trainer, trainer.current_epoch, failure)
            return None
        if is_distributed(trainer):  # eval-mode buffers (batch norm) differ: score rank 0's view
            captured = trainer.strategy.broadcast(captured, src=0)
        features, logits = captured
        seconds = time.perf_counter() - start
        epoch, step = trainer.current_epoch, trainer.global_step
        return Evaluation(epoch, step, features, logits, seconds, log_step=log_step)

    def _hand_off(self, trainer: pl.Trainer, evaluation: Evaluation) -> None:
        """Run the evaluation here and deliver it, or start it on the background worker; either
        way with an :class:`Evaluator` taken now (the previous RSMs and ranges are delivered)."""
        evaluator = Evaluator(
            self.config,
            self._labels,
            self._solver_threads,
            targets=self._targets,
            previous=dict(self._previous),
            ranges=dict(self._ranges),
            caches=self._caches,
        )
        render = self.config.log_images and trainer.is_global_zero
        if self._background is not None:
            self._background.submit(evaluation, lambda e, group: evaluator.run(e, group, render))
            return
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        outcome = evaluator.run(evaluation, is_distributed(trainer), render, progress)
        self._deliver(trainer, outcome)

    def _deliver(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        """On the training thread: a warning, or the RSMs kept for the next drift and colour
        ranges, then :func:`~lightning_rsm.callbacks.reporting.report`."""
        if outcome.failure is not None:
            self._warn_failed(trainer, outcome.epoch, outcome.failure)
            return
        self._previous = {layer: kinds["semantic"] for layer, kinds in outcome.rsms.items()}
        self.layer_rsa = outcome.layer_rsa
        if self.config.heatmap_range is None:
            self._ranges = {**outcome.ranges, **self._ranges}
        reporting.report(
            trainer, outcome, self.history, warn_once=self._warnings.warn, archive=self._archive
        )

    def _warn_failed(self, trainer: pl.Trainer, epoch: int, failure: tuple[int, str]) -> None:
        rank, error = failure
        where = f" on rank {rank}, so every rank skipped it" if is_distributed(trainer) else ""
        rank_zero_warn(
            f"`RSMMonitor` evaluation at epoch {epoch} failed and was skipped{where}; training "
            f"goes on. {error}"
        )

    # ------------------------------------------------------------------ background

    def _start_background(self, trainer: pl.Trainer) -> None:
        """With ``background=True``: the worker (and its process group: every rank is here)."""
        self._stop_background()
        if not self.config.background:
            return
        device = trainer.strategy.root_device
        keep_on_cuda = device.type == "cuda" and self.config.matcher in TORCH_MATCHERS
        # one solver thread by default; one on CUDA, where the worker's stream is not shared
        self._solver_threads = 1 if keep_on_cuda else self.config.solver_threads or 1
        self._trainer = trainer
        self._background = bg.Background(
            distributed=is_distributed(trainer),
            threads=torch.get_num_threads(),  # the same intra-op threads: the same numbers
            keep_on_cuda=keep_on_cuda,
        )

    def _stop_background(self) -> None:
        if self._background is not None:
            self._background.close()
            self._background = None
        self._trainer = None

    def _deliver_finished(self, trainer: pl.Trainer, wait: bool = False) -> None:
        """Deliver the background evaluation if it has finished (with ``wait``, once it has)."""
        if self._background is None:
            return
        outcome = self._background.finished(wait)
        if outcome is not None:
            self._deliver(trainer, outcome)

    def _settle_for_checkpoint(self) -> list[dict[str, Any]]:
        """Before a checkpoint: deliver a finished evaluation; keep one still running on features
        of the checkpoint's step as a marker, re-captured from the checkpoint's weights at
        resume (:meth:`_recapture_pending`); wait for one taken earlier."""
        background, trainer = self._background, self._trainer
        if background is None or background.pending is None or trainer is None:
            return []
        pending = background.pending
        outcome = background.finished(wait=pending.step != trainer.global_step)
        if outcome is not None:
            self._deliver(trainer, outcome)
            return []
        return [
            {
                "epoch": pending.epoch,
                "step": pending.step,
                "log_step": pending.log_step,
                "fingerprint": pending.fingerprint,
            }
        ]

    def _recapture_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At resume: run the probe again on the restored weights for each evaluation that
        was pending at the checkpoint, and compute it as if it had been taken then."""
        markers, self._to_recapture = self._to_recapture, []
        for marker in markers:
            log_step = marker.get("log_step", marker["step"])
            with untouched(pl_module):
                evaluation = self._capture_evaluation(trainer, pl_module, log_step)
            if evaluation is None:
                continue
            if bg.fingerprint(evaluation.features) != marker["fingerprint"]:
                rank_zero_warn(
                    f"`RSMMonitor`: the probe's features on the checkpoint's weights differ from "
                    f"those taken at epoch {marker['epoch']} (step {marker['step']}), whose "
                    "evaluation was pending when the checkpoint was saved; it is computed from "
                    "the restored weights."
                )
            evaluation = replace(evaluation, epoch=marker["epoch"], step=marker["step"])
            self._hand_off(trainer, evaluation)
