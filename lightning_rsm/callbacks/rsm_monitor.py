"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_rsm.callbacks import background as bg
from lightning_rsm.callbacks import validation
from lightning_rsm.callbacks.background import Evaluation, Outcome, Rsms
from lightning_rsm.callbacks.probe import Probe, capture_layers, read_probe, untouched
from lightning_rsm.callbacks.ranks import run_on_every_rank
from lightning_rsm.functional import (
    compare_rsms,
    jensen_shannon_similarity,
    rsa_matrix,
    rsm_scores,
    semantic_rsm,
    spatio_semantic_rsm,
)
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS
from lightning_rsm.functional.rsm import _TORCH_MATCHERS
from lightning_rsm.image_logging import log_images
from lightning_rsm.namespaces import CALLBACK_BASES, WarningCache, is_fitting, rank_zero_warn
from lightning_rsm.plotting import default_colour_range, rsm_images

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl


class RSMMonitor(*CALLBACK_BASES):
    r"""Monitor semantic RSMs of chosen layers on a fixed probe set during training.

    On each evaluation (every ``every_n_epochs`` epochs: after the epoch's validation, or after
    the training epoch when no validation ran in it; never during the sanity check) the probe
    is run through the model in eval mode, without gradients and with every RNG state restored,
    the outputs of ``layers`` are captured with forward hooks, and per layer the semantic RSM
    (and the spatially aligned baseline) is computed and scored with
    :func:`~lightning_rsm.functional.rsm_scores`. Scalars go through ``pl_module.log``, so
    ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them. TensorBoard loggers also get
    the heatmaps (samples sorted by label, a colour scale fixed for the run) and the layer x
    layer RSA matrix, written by rank 0. Under DDP the ranks share the RSMs' work; if any rank
    fails in an evaluation, every rank skips it with the same warning and training goes on.

    With ``background=True`` only the probe forward runs in the hook (it needs the weights of
    that moment); the features are copied off and the RSMs, scores and images are computed by
    a worker thread while training goes on, with the same numbers as ``background=False``, bit
    for bit, and the same guarantees (training is unchanged, resume equals a straight run, DDP
    equals one process). Results are logged from the training thread, each with the epoch and
    step at which its features were taken: history rows, images, and scalars through
    ``logger.log_metrics(..., step=...)`` (plus ``epoch``) as soon as they are picked up (after
    any training batch). At most one evaluation is pending: a due one first waits for the
    last, so training waits only when the RSMs take longer than ``every_n_epochs`` epochs.
    **Lateness**: scores reach ``pl_module.log`` (``ModelCheckpoint``, ``EarlyStopping``,
    ``trainer.callback_metrics``) at the first epoch end at which they are ready, usually the
    next epoch's and at the latest the next evaluation's, so a callback monitoring them at
    epoch ``e`` sees an earlier evaluation's value. Two evaluations are waited for in their own
    hook: the first of a fit when a callback monitors a ``rsm/`` key (so that key exists at its
    first check) and that of the last epoch (``max_epochs``, ``max_steps``, ``should_stop``
    already set). A fit stopped otherwise waits at its end and logs the rest to the history and
    the loggers, not to ``pl_module.log`` (Lightning allows no logging there). A checkpoint
    saved while an evaluation runs on features of the checkpoint's own step stores where it
    was taken, not the features; at resume the probe is run again on the restored weights
    (checked against a fingerprint; a mismatch is a warning) and the evaluation computed then.
    An exception in training stops the worker (a running evaluation ends unwaited and is
    dropped); a failure on the worker is a warning. Under DDP the worker's collectives run in
    a gloo process group of its own, created by every rank at setup. On CUDA the ``"auction"``
    and ``"greedy"`` matchers run on the device in a stream of the worker's own; the scipy
    matchers work on CPU copies (whose float32 matmuls may round differently from the
    synchronous path's on the GPU). No progress bar is shown.

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
        probe: the probe set, fixed for the run: a ``DataLoader`` or ``Dataset`` yielding tensors
            or ``(inputs, labels)`` tuples, or a tuple ``(inputs,)`` / ``(inputs, labels)`` of
            tensors; read once, at fit start. Class ids ``(N,)`` (integer) or multi-hot labels
            ``(N, L)`` enable the retrieval scores.
        layers: module names as in ``model.named_modules()``; outputs of shape
            ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)`` (tuple outputs: their first tensor).
        every_n_epochs: evaluate after every n-th epoch.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: LAP solver, as in :func:`~lightning_rsm.functional.semantic_rsm`.
        sigma: RBF bandwidth; default the median heuristic of each evaluation.
        window: window size of ``matcher="windowed"``.
        tol: certified cosine-scale tolerance of ``matcher="auction"``.
        baseline: also compute the spatially aligned baseline RSM and its scores.
        max_positions: cap on the positions (``H * W`` or ``T``) per sample; larger maps are
            average-pooled first (see :mod:`lightning_rsm.functional.options`). ``None`` keeps
            every position (exact for the layer, slow for large maps).
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

    Attributes:
        history: one dict per evaluation: ``epoch``, ``step`` (where its features were taken)
            and the logged scalars, in the order of the evaluations.
        layer_rsa: the last evaluation's layer x layer RSA matrix ``(L, L)``.

    Raises:
        MisconfigurationException: If an option has a value that is not allowed; at fit start,
            if a layer is not a module of the model.
        TypeError: If ``probe``, ``targets`` or ``logits_fn`` have the wrong type, or labels
            are not integer class ids or multi-hot values (at construction for tensors, at fit
            start for loaders).
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
        probe: Probe,
        layers: Sequence[str],
        *,
        every_n_epochs: int = 1,
        kernel: str = "cosine",
        matcher: str = "exact",
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        baseline: bool = True,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        batch_size: int = 256,
        logits_fn: Callable[[Any], Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
        method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
        background: bool = False,
        num_workers: int | None = None,
    ) -> None:
        validation.check_layers(layers)
        validation.check_options(
            every_n_epochs=every_n_epochs,
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
        self.heatmap_range = validation.check_heatmap_range(heatmap_range)
        validation.check_logits_fn(logits_fn)
        validation.check_probe(probe)
        self.targets = validation.check_targets(targets)

        self.probe = probe
        self.layers = list(layers)
        self.every_n_epochs = every_n_epochs
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

        self.history: list[dict[str, float]] = []
        self.layer_rsa: Tensor | None = None
        self._last_epoch = -1
        self._previous: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._inputs: Tensor | None = None
        self._labels: Tensor | None = None
        self._use_logits = True
        self._warnings = WarningCache()
        self._background: bg.Background | None = None
        self._trainer: pl.Trainer | None = None  # while a background worker runs: checkpoints
        self._solver_threads = num_workers
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
        self._prepare_probe(trainer, pl_module)
        self._recapture_pending(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._deliver_finished(trainer)

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
            "previous": dict(self._previous),
            "ranges": {layer: list(r) for layer, r in self._ranges.items()},
            "pending": pending,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]
        self._last_epoch = state_dict["last_epoch"]
        self._previous = dict(state_dict["previous"])
        self._ranges = {layer: (r[0], r[1]) for layer, r in state_dict["ranges"].items()}
        self._to_recapture = [dict(p) for p in state_dict.get("pending", [])]

    # ------------------------------------------------------------------ fit start

    def _prepare_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the probe, check it, the targets and the layers, and find the logits."""
        validation.check_layers_exist(pl_module, self.layers)
        with untouched(pl_module):
            self._inputs, self._labels = read_probe(self.probe, self.batch_size)
        validation.check_targets_match_probe(self.targets, self._inputs.shape[0])
        if self._labels is None:
            self._warnings.warn("The probe has no labels: retrieval scores are not computed.")
        self._use_logits = True
        with untouched(pl_module):
            _, logits = self._capture(trainer, pl_module, self._inputs[:2])
        if logits is not None:
            return
        if self.logits_fn is not None:
            raise ValueError(
                "Expected `logits_fn` to return logits of shape (B, K) with K >= 2 on a "
                "probe batch of B samples, but it did not."
            )
        self._use_logits = False
        self._warnings.warn(
            "The model's forward output on the probe is not a (B, K) logits tensor: the "
            "probability agreement is not computed. Pass `logits_fn` to pick the logits."
        )

    # ------------------------------------------------------------------ evaluation

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate if due, then give the newest scores to ``pl_module.log``."""
        self._evaluate_if_due(trainer, pl_module)
        self._log_scores(trainer, pl_module)

    def _evaluate_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self._last_epoch or (epoch + 1) % self.every_n_epochs:
            return
        self._last_epoch = epoch
        self._deliver_finished(trainer, wait=True)  # at most one evaluation pending
        with untouched(pl_module):
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Capture here, in the training loop; the RSMs, scores and images here or on the
        background worker."""
        evaluation = self._capture_evaluation(trainer, pl_module)
        if evaluation is not None:
            self._hand_off(trainer, evaluation)

    def _capture_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Evaluation | None:
        """The probe's features now (rank 0's under DDP); None on every rank if one failed."""
        start = time.perf_counter()
        captured = self._attempt(trainer, lambda: self._capture(trainer, pl_module, self._inputs))
        if captured is None:
            return None
        if _is_distributed(trainer):  # eval-mode buffers (batch norm) differ: score rank 0's view
            captured = trainer.strategy.broadcast(captured, src=0)
        features, logits = captured
        seconds = time.perf_counter() - start
        return Evaluation(trainer.current_epoch, trainer.global_step, features, logits, seconds)

    def _hand_off(self, trainer: pl.Trainer, evaluation: Evaluation) -> None:
        """Compute and deliver now, or start the computation on the background worker."""
        render = self.log_images and trainer.is_global_zero
        if self._background is not None:
            self._background.submit(
                evaluation, lambda e, distributed: self._compute(e, distributed, render)
            )
            return
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        outcome = self._compute(evaluation, _is_distributed(trainer), render, progress)
        self._deliver(trainer, outcome)

    def _compute(
        self,
        evaluation: Evaluation,
        distributed: bool | dist.ProcessGroup,
        render: bool,
        progress: bool = False,
    ) -> Outcome:
        """The RSMs (shared among ranks), then scores, then images (``render``); each step ends
        with the ranks agreeing that it worked, so a fault on one rank never strands the
        others. Runs no Lightning code, so that it can run on the background worker."""
        start = time.perf_counter()
        features, logits = evaluation.features, evaluation.logits
        outcome = Outcome(evaluation.epoch, evaluation.step)
        semantic, outcome.failure = run_on_every_rank(
            lambda: self._semantic_rsms(features, distributed, progress), distributed=distributed
        )
        if outcome.failure is not None:
            return outcome
        scored, outcome.failure = run_on_every_rank(
            lambda: self._score(features, semantic, logits), distributed=distributed
        )
        if outcome.failure is not None:
            return outcome
        outcome.scores, outcome.rsms, outcome.layer_rsa = scored
        outcome.scores["rsm/time_s"] = evaluation.seconds + time.perf_counter() - start
        if render:
            outcome.images, outcome.ranges = self._render(outcome.rsms, outcome.layer_rsa)
        return outcome

    def _attempt(self, trainer: pl.Trainer, step: Callable[[], Any]) -> Any:
        """Run one step of an evaluation on every rank; None on every rank if any rank failed."""
        result, failure = run_on_every_rank(step, distributed=_is_distributed(trainer))
        if failure is not None:
            self._warn_failed(trainer, trainer.current_epoch, failure)
        return result

    def _warn_failed(self, trainer: pl.Trainer, epoch: int, failure: tuple[int, str]) -> None:
        rank, error = failure
        where = f" on rank {rank}, so every rank skipped it" if _is_distributed(trainer) else ""
        rank_zero_warn(
            f"`RSMMonitor` evaluation at epoch {epoch} failed and was skipped{where}; training "
            f"goes on. {error}"
        )

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        return capture_layers(
            pl_module,
            self.layers,
            inputs,
            batch_size=self.batch_size,
            max_positions=self.max_positions,
            logits_fn=self.logits_fn,
            want_logits=self._use_logits,
            forward_context=trainer.precision_plugin.forward_context,
        )

    def _semantic_rsms(
        self, features: Mapping[str, Tensor], distributed: bool | dist.ProcessGroup, progress: bool
    ) -> dict[str, Tensor]:
        """The semantic RSM of each layer; a bar of pairs solved per layer when ``progress``."""
        return {
            layer: semantic_rsm(
                concepts,
                kernel=self.kernel,
                matcher=self.matcher,
                sigma=self.sigma,
                window=self.window,
                tol=self.tol,
                num_workers=self._solver_threads,
                distributed=distributed,
                progress=progress and f"RSMMonitor {layer}",
            )
            for layer, concepts in features.items()
        }

    def _score(
        self, features: Mapping[str, Tensor], semantic: Mapping[str, Tensor], logits: Tensor | None
    ) -> tuple[dict[str, float], Rsms, Tensor]:
        """Scores of every RSM, the RSMs (float32, CPU) and the layer x layer RSA."""
        output_similarity = None if logits is None else jensen_shannon_similarity(logits.double())
        scores: dict[str, float] = {}
        rsms: Rsms = {}
        for layer in self.layers:
            kinds = {"semantic": semantic[layer]}
            if self.baseline:
                kinds["baseline"] = spatio_semantic_rsm(
                    features[layer], kernel=self.kernel, sigma=self.sigma
                )
            rsms[layer] = kinds = {kind: rsm.float().cpu() for kind, rsm in kinds.items()}
            for kind, rsm in kinds.items():
                quality = rsm_scores(rsm, self._labels, output_similarity=output_similarity)
                scores.update({f"rsm/{layer}/{kind}/{k}": float(v) for k, v in quality.items()})
            scores.update(self._comparisons(layer, kinds["semantic"]))
        layer_rsa = rsa_matrix([kinds["semantic"] for kinds in rsms.values()], method=self.method)
        return scores, rsms, layer_rsa

    def _comparisons(self, layer: str, rsm: Tensor) -> dict[str, float]:
        """RSA with the previous evaluation's RSM and with each target."""
        others = {f"vs_{name}": target for name, target in self.targets.items()}
        if layer in self._previous:
            others["rsa_to_previous"] = self._previous[layer]
        return {
            f"rsm/{layer}/{name}": float(compare_rsms(rsm, other, method=self.method))
            for name, other in others.items()
        }

    # ------------------------------------------------------------------ logging

    def _render(
        self, rsms: Rsms, layer_rsa: Tensor | None
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
        """The heatmaps and the colour ranges they use (kept by :meth:`_deliver`)."""
        ranges = {layer: self._colour_range(layer, kinds) for layer, kinds in rsms.items()}
        return rsm_images(rsms, self._labels, ranges, layer_rsa), ranges

    def _colour_range(self, layer: str, kinds: Mapping[str, Tensor]) -> tuple[float, float]:
        """``heatmap_range``, or the layer's range fixed at its first evaluation."""
        if self.heatmap_range is not None:
            return self.heatmap_range
        if layer in self._ranges:
            return self._ranges[layer]
        return default_colour_range(self.kernel, list(kinds.values()))

    def _deliver(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        """Record an outcome on the training thread: a warning, or the history row, the RSMs
        for the next drift, images (and, from the background, scalars) to the loggers at the
        evaluation's step; ``pl_module.log`` follows at an epoch end (:meth:`_log_scores`)."""
        if outcome.failure is not None:
            self._warn_failed(trainer, outcome.epoch, outcome.failure)
            return
        self.history.append({"epoch": outcome.epoch, "step": outcome.step, **outcome.scores})
        self._previous = {layer: kinds["semantic"] for layer, kinds in outcome.rsms.items()}
        self.layer_rsa = outcome.layer_rsa
        if self.heatmap_range is None:
            self._ranges = {**outcome.ranges, **self._ranges}
        if outcome.images:
            log_images(trainer.loggers, outcome.images, outcome.step, warn_once=self._warnings.warn)
        if self._background is not None and trainer.is_global_zero:
            scalars = {"epoch": outcome.epoch, **outcome.scores}
            bg.log_scalars(trainer.loggers, scalars, outcome.step)
        self._unlogged = outcome.scores

    def _log_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``pl_module.log`` the newest scores not yet logged (first delivering a finished
        background evaluation, waited for when the fit ends or a monitored key is missing);
        the background's scalars reached the loggers already, at their own step."""
        if self._background is not None:
            wait = bg.ends_fit(trainer) or bg.misses_monitored_key(trainer)
            self._deliver_finished(trainer, wait=wait)
        if self._unlogged is None:
            return
        scores, self._unlogged = self._unlogged, None
        for name, value in scores.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1,
                          logger=self._background is None)  # fmt: skip

    # ------------------------------------------------------------------ background

    def _start_background(self, trainer: pl.Trainer) -> None:
        """With ``background=True``: the worker (and its process group: every rank is here)."""
        self._stop_background()
        if not self.background:
            return
        device = trainer.strategy.root_device
        keep_on_cuda = device.type == "cuda" and self.matcher in _TORCH_MATCHERS
        # one solver thread by default; one on CUDA, where the worker's stream is not shared
        self._solver_threads = 1 if keep_on_cuda else self.num_workers or 1
        self._trainer = trainer
        self._background = bg.Background(
            distributed=_is_distributed(trainer),
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
        background = self._background
        if background is None or background.pending is None:
            return []
        pending, trainer = background.pending, self._trainer
        outcome = background.finished(wait=pending.step != trainer.global_step)
        if outcome is not None:
            self._deliver(trainer, outcome)
            return []
        return [{"epoch": pending.epoch, "step": pending.step, "fingerprint": pending.fingerprint}]

    def _recapture_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At resume: run the probe again on the restored weights for each evaluation that
        was pending at the checkpoint, and compute it as if it had been taken then."""
        markers, self._to_recapture = self._to_recapture, []
        for marker in markers:
            with untouched(pl_module):
                evaluation = self._capture_evaluation(trainer, pl_module)
            if evaluation is None:
                continue
            if bg.fingerprint(evaluation.features) != marker["fingerprint"]:
                rank_zero_warn(
                    f"`RSMMonitor`: the probe's features on the checkpoint's weights differ from "
                    f"those taken at epoch {marker['epoch']} (step {marker['step']}), whose "
                    "evaluation was pending when the checkpoint was saved; it is computed from "
                    "the restored weights."
                )
            self._hand_off(trainer, replace(evaluation, epoch=marker["epoch"], step=marker["step"]))


def _validation_ends_the_epoch(trainer: pl.Trainer) -> bool:
    """A validation run at the end of a training epoch of ``fit`` (not the sanity check)."""
    return (
        not trainer.sanity_checking
        and is_fitting(trainer)
        and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    )


def _is_distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
