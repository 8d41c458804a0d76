"""The evaluation pipeline of :class:`~lightning_rsm.callbacks.RSMMonitor`, from the probe's
features to the loggers.

``_prepare_probe`` (once, at fit start: the probe read and checked, its logits found) ->
``_capture_evaluation`` (the probe forward, in the hook: it needs the weights of its step) ->
``_hand_off`` -> ``_compute`` (:class:`~lightning_rsm.callbacks.scoring.Scoring`, in the hook or
on the background worker) -> ``_deliver`` (on the training thread: history, images and scalars
at the features' step) -> ``_log_scores`` (``pl_module.log``, at the next hook that allows it).
With ``background=True`` a :class:`~lightning_rsm.callbacks.background.Background` runs the
computation, at most one evaluation at a time; a checkpoint taken while one runs stores a
marker that is re-captured at resume.

:class:`EvaluationPipeline` is a base class of ``RSMMonitor`` and works on its options and
state (declared below); the callback decides when to evaluate and deliver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_rsm.callbacks import background as bg
from lightning_rsm.callbacks import validation
from lightning_rsm.callbacks.background import Evaluation, Outcome
from lightning_rsm.callbacks.batches import batch_length, slice_batch
from lightning_rsm.callbacks.probe import capture_layers, read_probe, untouched
from lightning_rsm.callbacks.probe_selection import select_probe, validation_loader
from lightning_rsm.callbacks.ranks import is_distributed, run_on_every_rank
from lightning_rsm.callbacks.schedule import Schedule
from lightning_rsm.callbacks.scoring import Scoring
from lightning_rsm.functional import AssignmentCache
from lightning_rsm.functional.options import TORCH_MATCHERS
from lightning_rsm.image_logging import log_images
from lightning_rsm.namespaces import WarningCache, rank_zero_warn

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl


class EvaluationPipeline:
    """Capture, compute (here or on the background worker), deliver and log one evaluation."""

    # options of RSMMonitor
    layers: list[str]
    kernel: str
    matcher: str
    sigma: float | None
    window: int
    tol: float
    baseline: bool
    method: str
    targets: dict[str, Tensor]
    heatmap_range: tuple[float, float] | None
    log_images: bool
    background: bool
    num_workers: int | None
    batch_size: int
    max_positions: int | None
    logits_fn: Callable[[Any], Tensor] | None
    forward_fn: Any
    special_tokens: int
    tokens: str
    token_grid: Any
    probe: Any
    probe_size: int
    input_fn: Any
    label_fn: Any
    # state of RSMMonitor
    history: list[dict[str, float]]
    layer_rsa: Tensor | None
    _schedule: Schedule
    _inputs: Any
    _labels: Tensor | None
    _use_logits: bool
    _previous: dict[str, Tensor]
    _ranges: dict[str, tuple[float, float]]
    _warnings: WarningCache
    _solver_threads: int | None
    _caches: dict[str, AssignmentCache]
    _background: bg.Background | None
    _trainer: pl.Trainer | None
    _unlogged: dict[str, float] | None
    _to_recapture: list[dict[str, Any]]

    # ------------------------------------------------------------------ the probe

    def _prepare_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the probe, check it, the targets and the layers, and find the logits."""
        validation.check_layers_exist(pl_module, self.layers)
        with untouched(pl_module):
            self._inputs, self._labels = self._read_probe(trainer)
        validation.check_targets_match_probe(self.targets, batch_length(self._inputs))
        if self._labels is None:
            self._warnings.warn("The probe has no labels: retrieval scores are not computed.")
        self._use_logits = True
        with untouched(pl_module):
            _, logits = self._capture(trainer, pl_module, slice_batch(self._inputs, 0, 2))
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

    def _read_probe(self, trainer: pl.Trainer) -> tuple[Any, Tensor | None]:
        """The probe's inputs and labels: the one given, or chosen from the validation data."""
        if self.probe is not None:
            return read_probe(self.probe, self.batch_size, self.input_fn, self.label_fn)
        loader = validation_loader(trainer)
        probe = select_probe(loader, self.probe_size, self.batch_size, self.input_fn, self.label_fn)
        return trainer.strategy.broadcast(probe, src=0) if is_distributed(trainer) else probe

    # ------------------------------------------------------------------ one evaluation

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
        if is_distributed(trainer):  # eval-mode buffers (batch norm) differ: score rank 0's view
            captured = trainer.strategy.broadcast(captured, src=0)
        features, logits = captured
        seconds = time.perf_counter() - start
        return Evaluation(trainer.current_epoch, trainer.global_step, features, logits, seconds)

    def _hand_off(self, trainer: pl.Trainer, evaluation: Evaluation) -> None:
        """Compute and deliver now, or start the computation on the background worker; either
        way from a :class:`Scoring` taken now (the previous RSMs and ranges are delivered)."""
        render = self.log_images and trainer.is_global_zero
        scoring = self._scoring()
        if self._background is not None:
            self._background.submit(
                evaluation, lambda e, group: self._compute(e, scoring, group, render)
            )
            return
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        distributed = is_distributed(trainer)
        self._deliver(trainer, self._compute(evaluation, scoring, distributed, render, progress))

    def _compute(
        self,
        evaluation: Evaluation,
        scoring: Scoring,
        distributed: bool | dist.ProcessGroup,
        render: bool,
        progress: bool = False,
    ) -> Outcome:
        """The RSMs, scores and images of ``evaluation`` (:meth:`Scoring.compute`); runs no
        Lightning code, so that it can run on the background worker."""
        return scoring.compute(evaluation, distributed, render, progress)

    def _scoring(self) -> Scoring:
        return Scoring(
            layers=tuple(self.layers),
            kernel=self.kernel,
            matcher=self.matcher,
            sigma=self.sigma,
            window=self.window,
            tol=self.tol,
            baseline=self.baseline,
            method=self.method,
            targets=self.targets,
            labels=self._labels,
            heatmap_range=self.heatmap_range,
            num_workers=self._solver_threads,
            previous=dict(self._previous),
            ranges=dict(self._ranges),
            caches=self._caches,
        )

    def _attempt(self, trainer: pl.Trainer, step: Callable[[], Any]) -> Any:
        """Run one step of an evaluation on every rank; None on every rank if any rank failed."""
        result, failure = run_on_every_rank(step, distributed=is_distributed(trainer))
        if failure is not None:
            self._warn_failed(trainer, trainer.current_epoch, failure)
        return result

    def _warn_failed(self, trainer: pl.Trainer, epoch: int, failure: tuple[int, str]) -> None:
        rank, error = failure
        where = f" on rank {rank}, so every rank skipped it" if is_distributed(trainer) else ""
        rank_zero_warn(
            f"`RSMMonitor` evaluation at epoch {epoch} failed and was skipped{where}; training "
            f"goes on. {error}"
        )

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any
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
            forward_fn=self.forward_fn,
            special_tokens=self.special_tokens,
            tokens=self.tokens,
            token_grid=self.token_grid,
            warn=lambda message: self._warnings.warn(f"RSMMonitor: {message}"),
        )

    # ------------------------------------------------------------------ logging

    def _deliver(self, trainer: pl.Trainer, outcome: Outcome) -> None:
        """Record an outcome on the training thread: a warning, or the history row, the RSMs
        for the next drift, images (and, per step or from the background, scalars) to the
        loggers at the evaluation's step; ``pl_module.log`` follows (:meth:`_log_scores`)."""
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
        if self._schedule.logs_to_loggers(self.background) and trainer.is_global_zero:
            scalars = {"epoch": outcome.epoch, **outcome.scores}
            bg.log_scalars(trainer.loggers, scalars, outcome.step)
        self._unlogged = outcome.scores

    def _log_scores(self, pl_module: pl.LightningModule, *, on_step: bool) -> None:
        """``pl_module.log`` the newest scores not yet logged (see :meth:`Schedule.log`)."""
        if self._unlogged is not None:
            scores, self._unlogged = self._unlogged, None
            self._schedule.log(pl_module, scores, on_step=on_step, background=self.background)

    # ------------------------------------------------------------------ background

    def _start_background(self, trainer: pl.Trainer) -> None:
        """With ``background=True``: the worker (and its process group: every rank is here)."""
        self._stop_background()
        if not self.background:
            return
        device = trainer.strategy.root_device
        keep_on_cuda = device.type == "cuda" and self.matcher in TORCH_MATCHERS
        # one solver thread by default; one on CUDA, where the worker's stream is not shared
        self._solver_threads = 1 if keep_on_cuda else self.num_workers or 1
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
