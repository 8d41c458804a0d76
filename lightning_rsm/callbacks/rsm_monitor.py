"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
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
    ImageFn,
    LogitsFn,
    Picker,
    ReferenceNetwork,
    batch_length,
    slice_batch,
)
from lightning_rsm.callbacks.config import MonitorConfig, as_misconfiguration
from lightning_rsm.callbacks.costs import (
    Measured,
    Settings,
    Spent,
    cost_advice,
    steady_costs,
    worker_has_a_core,
)
from lightning_rsm.callbacks.evaluation import (
    Evaluation,
    Evaluator,
    Outcome,
    Rsms,
    warm_start_caches,
)
from lightning_rsm.callbacks.probe import (
    Probe,
    ProbeData,
    capture_layers,
    check_layer_names,
    check_targets_match_probe,
    read_probe,
    untouched,
)
from lightning_rsm.callbacks.probe_selection import select_probe, validation_loader
from lightning_rsm.callbacks.ranks import is_distributed, run_on_every_rank
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS, TORCH_MATCHERS
from lightning_rsm.functional.pairs import available_cpus
from lightning_rsm.functional.representations import TokenGrid
from lightning_rsm.namespaces import CALLBACK_BASES, WarningCache, rank_zero_warn
from lightning_rsm.plotting import as_images, history_figure, neighbours_figure

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl
    from matplotlib.figure import Figure


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

    Where the results go (:mod:`lightning_rsm.callbacks.reporting`), at one step per evaluation: the
    step Lightning gives the epoch's other metrics (e.g. a ``val_loss`` logged in
    ``validation_step``), or with ``every_n_train_steps`` the ``trainer.global_step`` after the
    step; the scalars to every logger (``log_metrics``, whatever ``log_every_n_steps`` is), the
    figures (below) to every logger that takes images (what each receives:
    :mod:`lightning_rsm.image_logging`), drawn and written once by rank 0. As
    ``LearningRateMonitor`` does, the latest scores stay in ``trainer.callback_metrics``, the same
    on every rank (no ``sync_dist`` needed, no warning under DDP), so ``ModelCheckpoint``,
    ``EarlyStopping`` or any callback monitoring an ``rsm/`` key finds it from the first evaluation
    on, whatever its own schedule; before the first evaluation the key is missing
    (``ModelCheckpoint`` after a validation and a strict ``EarlyStopping`` then raise; otherwise
    they warn and skip), and between evaluations a reader sees the latest score again (an
    ``EarlyStopping`` counts that against its ``patience``), so give a reader the monitor's schedule
    (e.g. both ``every_n_epochs=2``).

    With ``background=True`` only the probe forward runs in the hook; the RSMs, scores and images
    are computed by a worker thread while training goes on, with the same numbers as
    ``background=False``, bit for bit, the same history and the same logger steps. The scores
    reach ``trainer.callback_metrics`` when the worker has finished (after a later batch or
    epoch end; the first evaluation when an ``rsm/`` key is monitored and the last one are
    waited for), so a reader sees them late. While training waits for the worker, a progress line
    says so (rank 0, with the Trainer's progress bar on). Ctrl-C or an exception in training
    cancels a running evaluation at its next block of pairs, with a warning naming its epoch and
    step, and leaves no thread behind. The whole contract (checkpoints, exceptions, DDP, CUDA):
    :mod:`lightning_rsm.callbacks.background`.

    What it costs: from the second evaluation on, the monitor compares the time it holds training
    up (probe forward, logging, plus the RSMs and pictures when synchronous or the wait for the
    worker; the first evaluation, which compiles the solver and solves every pair cold, left
    out) with the training time between two evaluations; above a quarter it warns once per fit
    with the measured times and the ``every_n_*``, probe size, ``max_positions``,
    ``log_images=False`` (and ``background=True`` where a core is free) that would bring it
    under (:mod:`lightning_rsm.callbacks.costs`).
    ``background=True`` where the worker has no core of its own (training on the CPU with every
    core in use) warns at fit start.

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

    Logged figures (with ``log_images=True``; drawn by :mod:`lightning_rsm.plotting`, at the
    scalars' step):

    ===================================  =========================================================
    ``rsm/<layer>/heatmap``              semantic and baseline RSM side by side, samples grouped
                                         by label, one colour scale with its colour bar; title:
                                         layer, epoch and step
    ``rsm/<layer>/neighbours``           for image probes (inputs ``(N, 1 | 3, H, W)``, or any
                                         probe with ``image_fn``): one query per class (at most
                                         8) and its 5 nearest neighbours under each RSM, right
                                         and wrong class marked; other probes: none, silently
    ``rsm/layer_rsa``                    the layer x layer RSA, names and values (2+ layers)
    ``rsm/history``                      at fit end, at the last evaluation's step: every score
                                         over the evaluations (:meth:`plot_history`)
    ===================================  =========================================================

    The colour scale of a layer's heatmaps is held across evaluations so that they compare by
    colour, and changed only where holding it would blank the picture
    (:func:`~lightning_rsm.plotting.next_colour_range`: the off-diagonal 1st-99th percentiles of the
    first evaluation, kept while the new data's range overlaps it by half); it is saved in
    checkpoints, so a resumed run draws as a straight one. Drawing costs about the same per layer at
    any N (the neighbours figure the most) and is not counted in ``rsm/time_s``: with a small probe
    it takes as long as the RSMs or longer (the demo, N = 120 and 3 layers, on 2 busy cores: 5.4 s
    beside 3.8 s), with a large one a few percent (``benchmarks/README.md``). ``log_images=False``
    skips it; with ``background=True`` it runs on the worker.

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
        log_images: draw the figures (above) and send them to the Trainer's loggers (nothing is
            drawn for a Trainer without loggers).
        heatmap_range: fixed ``(vmin, vmax)`` of every heatmap; by default a scale from the
            data, held across evaluations (above).
        image_fn: maps the probe inputs (all N, as fed to the model) to images
            ``(N, 1 | 3, H, W)`` for the neighbours figures (e.g. un-normalise, pick a key);
            not needed when the inputs are such images. Checked at fit start.
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
        when_busy: what a due evaluation does while the background worker still computes the
            previous one: ``"wait"`` (the default: every evaluation is computed, the history is
            the same as synchronously) or ``"skip"`` (training never waits; the skipped
            evaluations are not in the history nor logged, are listed in :attr:`skipped` and
            named in one warning at the fit's end; the evaluations of the fit's last epoch are
            always waited for). Only with ``background=True``.
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
        rsms: the last evaluation's RSMs (read-only copies).
        probe: the probe's inputs and labels, as read at fit start.
        skipped: this fit's evaluations skipped with ``when_busy="skip"``: ``epoch`` and
            ``step`` each.

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
            output is not a representation, ``image_fn`` does not return images
            ``(N, 1 | 3, H, W)``, a target network has no such layer or returns features of
            another N (the message names the target), or ``probe_ids`` has another length than
            the probe.

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
        targets: Mapping[str, ReferenceNetwork | Tensor] | None = None,
        method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
        image_fn: ImageFn | None = None,
        background: bool = False,
        solver_threads: int | None = None,
        warm_start_bytes: int = 2**28,
        when_busy: str = "wait",
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
        self._rsms: Rsms = {}  # the last RSMs (semantic: for rsa_to_previous)
        self._ranges: dict[str, tuple[float, float]] = {}  # heatmap colour ranges, per layer
        self._log_step = 0  # the last evaluation's log step, for `rsm/history` at fit end
        self._inputs: Any = None  # a tensor (N, ...), or a dict/tuple of them
        self._labels: Tensor | None = None
        self._images: Tensor | None = None  # the probe as images (N, 1 | 3, H, W), or None
        self._use_logits = True
        self._warnings = WarningCache()
        self._background: bg.Background | None = None
        self._trainer: pl.Trainer | None = None  # while a background worker runs: checkpoints
        self._solver_threads = self.config.solver_threads
        self._caches = warm_start_caches(
            self.config.layers, self.config.matcher, self.config.warm_start_bytes
        )
        self._to_recapture: list[dict[str, Any]] = []  # evaluations pending at the checkpoint
        self._measured = Measured()  # this fit's costs, for the one cost warning
        self.skipped: list[dict[str, int]] = []  # this fit's evaluations skipped (when_busy)
        self._targets: dict[str, Tensor] = {}  # every target's RSM (N, N), set at fit start
        self._archive: ArchiveWriter | None = None  # save_rsms=True, on rank 0, from fit start

    @property
    def layers(self) -> list[str]:
        """The monitored layers, in the order given."""
        return list(self.config.layers)

    @property
    def rsms(self) -> dict[str, dict[str, Tensor]]:
        """The last evaluation's RSMs, ``{layer: {kind: (N, N)}}`` (float32, CPU; copies), the
        matrices its scores were computed from. Empty before the first evaluation; after a
        resume, until the next evaluation, the checkpoint's semantic RSMs only."""
        return {
            layer: {kind: rsm.clone() for kind, rsm in kinds.items()}
            for layer, kinds in self._rsms.items()
        }

    @property
    def probe(self) -> ProbeData | None:
        """The probe the RSMs are computed on, read at fit start: ``(inputs, labels)`` (inputs
        as fed to the model, labels ``(N,)``/``(N, L)`` or None), in the RSMs' sample order;
        None before fit start. Not to be changed in place."""
        return None if self._inputs is None else ProbeData(self._inputs, self._labels)

    def plot_history(self) -> Figure:
        """Every score of :attr:`history` over the evaluations, a panel per score, a colour per
        layer, semantic solid and baseline dashed
        (:func:`~lightning_rsm.plotting.history_figure`); the figure logged as ``rsm/history``.

        Raises:
            ValueError: If there has been no evaluation yet.
        """
        return history_figure(self.history, layers=self.layers)

    def plot_neighbours(
        self, layer: str, *, queries: Sequence[int] | None = None, k: int = 5
    ) -> Figure:
        """What ``layer`` called similar at the last evaluation: query images and their top-``k``
        neighbours under each of its :attr:`rsms`
        (:func:`~lightning_rsm.plotting.neighbours_figure`).

        Args:
            layer: a monitored layer.
            queries: sample indices of the probe; default one per class, at most 8.
            k: neighbours per query and RSM, at most ``N - 1``.

        Raises:
            ValueError: If ``layer`` has no RSM yet, or the probe inputs are not images
                ``(N, 1 | 3, H, W)`` and no ``image_fn`` was given.
        """
        if layer not in self._rsms:
            raise ValueError(
                f"Expected `layer` to be a monitored layer with an evaluation, one of "
                f"{sorted(self._rsms)}, but got {layer!r}."
            )
        if self._images is None:
            raise ValueError(
                "Expected the probe inputs to be images (N, 1 | 3, H, W), or an `image_fn` "
                "that makes them images, but got neither."
            )
        return neighbours_figure(
            self._rsms[layer],
            self._images,
            self._labels,
            queries=queries,
            k=k,
            layer=layer,
            epoch=int(self.history[-1]["epoch"]),
            step=self._log_step,
        )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.config.layers, kernel=self.config.kernel)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._measured, self.skipped = Measured(), []
            self._start_background(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.probe is not None:  # else from the validation data, once it is set up
            self._prepare_probe(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule.check_score_readers(self.config, trainer)
        self._measured.start = time.perf_counter()
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
        self._report_history(trainer)
        self._warn_skipped()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_background(reason=type(exception).__name__)

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
            "previous": {layer: kinds["semantic"] for layer, kinds in self._rsms.items()},
            "ranges": {layer: list(r) for layer, r in self._ranges.items()},
            "log_step": self._log_step,
            "pending": pending,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]
        self._last_epoch = state_dict["last_epoch"]
        self._last_step = state_dict.get("last_step", -1)
        self._rsms = {layer: {"semantic": rsm} for layer, rsm in state_dict["previous"].items()}
        self._ranges = {layer: (r[0], r[1]) for layer, r in state_dict["ranges"].items()}
        self._log_step = state_dict.get("log_step", 0)
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
        self._images = as_images(self._inputs, config.image_fn)
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
                    **c.rsm_options,
                    **c.feature_options,
                    num_workers=self._solver_threads,
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
            **c.feature_options,
            logits_fn=c.logits_fn,
            want_logits=self._use_logits,
            forward_context=trainer.precision_plugin.forward_context,
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
        if self._skip_while_busy(trainer):
            return
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
        self._measured.captures += 1
        self._measured.capture_s += seconds
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
            previous={layer: kinds["semantic"] for layer, kinds in self._rsms.items()},
            ranges=dict(self._ranges),
            caches=self._caches,
            images=self._images,
        )
        render = self.config.log_images and trainer.is_global_zero and bool(trainer.loggers)
        if self._background is not None:
            self._background.submit(
                evaluation, lambda e, group, stop: evaluator.run(e, group, render, should_stop=stop)
            )
            return
        progress = _shows_progress(trainer)
        outcome = evaluator.run(evaluation, is_distributed(trainer), render, progress)
        self._deliver(trainer, outcome)

    def _deliver(self, trainer: pl.Trainer, outcome: Outcome, waited_s: float = 0.0) -> None:
        """On the training thread: a warning, or the RSMs kept (for :attr:`rsms` and the next
        drift) and the colour ranges held, then
        :func:`~lightning_rsm.callbacks.reporting.report`; ``waited_s``: how long training
        waited for this evaluation (background)."""
        if outcome.failure is not None:
            self._warn_failed(trainer, outcome.epoch, outcome.failure)
            return
        self._rsms, self._log_step = outcome.rsms, outcome.log_step
        self.layer_rsa = outcome.layer_rsa
        if self.config.heatmap_range is None:
            self._ranges.update(outcome.ranges)  # none when not drawn (another rank, no images)
        start = time.perf_counter()
        reporting.report(
            trainer, outcome, self.history, warn_once=self._warnings.warn, archive=self._archive
        )
        report_s = time.perf_counter() - start
        spent = Spent(outcome.scores["rsm/time_s"], outcome.render_s, report_s, waited_s)
        self._measured.spent.append(spent)
        self._warn_cost(trainer)

    def _warn_failed(self, trainer: pl.Trainer, epoch: int, failure: tuple[int, str]) -> None:
        rank, error = failure
        where = f" on rank {rank}, so every rank skipped it" if is_distributed(trainer) else ""
        rank_zero_warn(
            f"`RSMMonitor` evaluation at epoch {epoch} failed and was skipped{where}; training "
            f"goes on. {error}"
        )

    def _warn_cost(self, trainer: pl.Trainer) -> None:
        """Once per fit, from the second evaluation on: the warning of
        :func:`~lightning_rsm.callbacks.costs.cost_advice` when monitoring adds more than a
        quarter to training time (:func:`~lightning_rsm.callbacks.costs.steady_costs`: the
        first evaluation left out)."""
        measured, config = self._measured, self.config
        if measured.warned:
            return
        costs = steady_costs(measured, config.background, time.perf_counter())
        if costs is None:
            return
        settings = Settings(
            probe_size=batch_length(self._inputs),
            probe_given=config.probe is not None,
            every_n=config.every_n_train_steps or config.every_n_epochs or 1,
            by_steps=config.by_steps,
            max_positions=config.max_positions,
            background=config.background,
            free_core=self._worker_has_a_core(trainer),
        )
        message = cost_advice(
            costs.capture_s,
            costs.compute_s,
            costs.wait_s,
            costs.interval_s,
            settings,
            pictures_s=costs.pictures_s,
        )
        if message is not None:
            measured.warned = True
            rank_zero_warn(message)

    # ------------------------------------------------------------------ background

    def _worker_has_a_core(self, trainer: pl.Trainer) -> bool:
        """Whether a background worker's solver threads have cores of their own beside
        training's torch threads (training on an accelerator leaves the cores but one free)."""
        training = torch.get_num_threads() if trainer.strategy.root_device.type == "cpu" else 1
        solver = self.config.solver_threads or 1
        return worker_has_a_core(available_cpus(), training, solver)

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
        if not self._worker_has_a_core(trainer):
            cores, threads = available_cpus(), torch.get_num_threads()
            rank_zero_warn(
                f"`RSMMonitor(background=True)`: the worker has no core of its own ({cores} "
                f"cores for this process; training uses {threads} torch threads, the worker "
                f"{self._solver_threads} solver thread(s)), so its time comes out of training's. "
                "Pass background=False, or leave it a core (e.g. "
                f"torch.set_num_threads({max(cores - self._solver_threads, 1)}) before the fit)."
            )
        self._background = bg.Background(
            distributed=is_distributed(trainer),
            threads=torch.get_num_threads(),  # the same intra-op threads: the same numbers
            keep_on_cuda=keep_on_cuda,
        )

    def _stop_background(self, reason: str | None = None) -> None:
        """Cancel and join the worker; with ``reason`` (an exception's name), a warning naming
        the evaluation that was not reported."""
        if self._background is not None:
            busy = self._background.busy
            dropped = self._background.close()
            self._background = None
            if dropped is not None and reason is not None:
                state = "was cancelled unfinished" if busy else "had finished"
                rank_zero_warn(
                    f"`RSMMonitor`: the evaluation of epoch {dropped.epoch} (step {dropped.step}) "
                    f"{state} when training stopped ({reason}); it is not in the history."
                )
        self._trainer = None

    def _skip_while_busy(self, trainer: pl.Trainer) -> bool:
        """With ``when_busy="skip"``: whether to skip the due evaluation because the worker is
        still busy (on any rank); never in the fit's last epoch. A skip is kept in
        :attr:`skipped`."""
        if self.config.when_busy != "skip" or self._background is None:
            return False
        if schedule.ends_fit(trainer):
            return False
        self._deliver_finished(trainer)
        if not trainer.strategy.reduce_boolean_decision(self._background.busy, all=False):
            return False
        self.skipped.append({"epoch": trainer.current_epoch, "step": trainer.global_step})
        return True

    def _report_history(self, trainer: pl.Trainer) -> None:
        """At fit end: the scores over the evaluations (:meth:`plot_history`) as ``rsm/history``."""
        if self.config.log_images and self.history:
            reporting.report_history(
                trainer, self.plot_history, self._log_step, warn_once=self._warnings.warn
            )

    def _warn_skipped(self) -> None:
        if self.skipped:
            names = ", ".join(f"epoch {s['epoch']} (step {s['step']})" for s in self.skipped)
            rank_zero_warn(
                f"`RSMMonitor` skipped {len(self.skipped)} evaluation(s) while the worker was "
                f"busy (when_busy='skip'): {names}; they are not in the history. "
                "when_busy='wait' (the default) keeps every evaluation."
            )

    def _deliver_finished(self, trainer: pl.Trainer, wait: bool = False) -> None:
        """Deliver the background evaluation if it has finished (with ``wait``, once it has,
        with a progress line while training waits)."""
        if self._background is None:
            return
        waited = self._background.wait(progress=_shows_progress(trainer)) if wait else 0.0
        outcome = self._background.finished()
        if outcome is not None:
            self._deliver(trainer, outcome, waited)

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


def _shows_progress(trainer: pl.Trainer) -> bool:
    """Whether this process shows progress: rank 0 with the Trainer's progress bar on."""
    return trainer.is_global_zero and trainer.progress_bar_callback is not None
