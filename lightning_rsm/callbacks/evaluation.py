"""One evaluation of :class:`~lightning_rsm.callbacks.RSMMonitor`, from the probe's features to
the scores and pictures: the semantic RSMs (their work shared among ranks), their scores, the
layer x layer RSA and the figures (:func:`~lightning_rsm.plotting.evaluation_figures`: heatmaps,
the layer x layer RSA, nearest neighbours of image probes), rendered to RGB for the loggers.

An :class:`Evaluation` holds the probe's features at one step; :meth:`Evaluator.run` turns it into
an :class:`Outcome`. An :class:`Evaluator` holds everything the computation reads (the
:class:`~lightning_rsm.callbacks.config.MonitorConfig`, the probe's labels and images, the
previous evaluation's RSMs, the colour ranges held so far), taken when the evaluation is handed
off, so nothing here reads the callback while training goes on. Nothing here knows the Trainer: the
same call runs in the hook (``background=False``) and on the background worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.distributed as dist
from torch import Tensor

from lightning_rsm.callbacks.config import MonitorConfig
from lightning_rsm.callbacks.ranks import run_on_every_rank
from lightning_rsm.functional import (
    AssignmentCache,
    compare_rsms,
    jensen_shannon_similarity,
    rsa_matrix,
    rsm_scores,
    semantic_rsm,
    spatio_semantic_rsm,
)
from lightning_rsm.plotting import evaluation_figures, figure_to_rgb

Rsms = dict[str, dict[str, Tensor]]  # layer -> kind ("semantic", "baseline") -> (N, N)
Ranges = dict[str, tuple[float, float]]


@dataclass
class Evaluation:
    """The probe's features taken at ``epoch`` and global ``step``: concept vectors ``(N, S, C)``
    per layer, logits ``(N, K)`` or None, the seconds the capture took, and ``log_step``, the
    step its scalars and images are logged at. ``ready``: a CUDA event after the features' last
    write, for a worker stream to wait on (None on the CPU)."""

    epoch: int
    step: int
    features: dict[str, Tensor]
    logits: Tensor | None
    seconds: float
    log_step: int = 0
    ready: Any = None


@dataclass
class Outcome:
    """Scores (with ``rsm/time_s``), RSMs ``(N, N)`` (float32, CPU), the logits ``(N, K)`` they
    were scored with (or None), the layer x layer RSA, the images (tag -> uint8 RGB
    ``(H, W, 3)``), the heatmaps' colour ranges to hold for the next evaluation and the seconds
    spent drawing the images; or ``failure``: ``(rank, error text)``."""

    epoch: int
    step: int
    log_step: int
    scores: dict[str, float] = field(default_factory=dict)
    rsms: Rsms = field(default_factory=dict)
    logits: Tensor | None = None
    layer_rsa: Tensor | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict)
    ranges: Ranges = field(default_factory=dict)
    failure: tuple[int, str] | None = None
    render_s: float = 0.0


def warm_start_caches(
    layers: Sequence[str], matcher: str, max_bytes: int
) -> dict[str, AssignmentCache]:
    """One :class:`~lightning_rsm.functional.AssignmentCache` per layer sharing ``max_bytes``
    equally; none unless the matcher is exact and ``max_bytes`` is positive.

    Example:
        >>> caches = warm_start_caches(["a", "b"], "exact", 2**20)
        >>> sorted(caches), caches["a"].max_bytes
        (['a', 'b'], 524288)
    """
    if matcher != "exact" or max_bytes <= 0 or not layers:
        return {}
    return {layer: AssignmentCache(max_bytes=max_bytes // len(layers)) for layer in layers}


@dataclass(frozen=True)
class Evaluator:
    """The options of the monitor and the state one evaluation compares against.

    Attributes:
        config: the monitor's options (layers, kernel, matcher, baseline, targets, ...).
        labels: the probe's labels ``(N,)`` or ``(N, L)``, or None.
        solver_threads: threads of :func:`~lightning_rsm.functional.semantic_rsm`.
        targets: the target RSMs ``(N, N)`` by name (tensors given, and those of reference
            networks computed at fit start).
        previous: the previous evaluation's semantic RSM per layer (for ``rsa_to_previous``).
        ranges: the heatmaps' colour ranges held from the last evaluation, per layer
            (:func:`~lightning_rsm.plotting.next_colour_range`).
        images: the probe as images ``(N, 1 | 3, H, W)`` for the neighbours figures, or None.
        caches: each layer's warm-start cache (exact matcher); used by one evaluation at a time.
    """

    config: MonitorConfig
    labels: Tensor | None
    solver_threads: int | None
    targets: Mapping[str, Tensor] = field(default_factory=dict)
    previous: Mapping[str, Tensor] = field(default_factory=dict)
    ranges: Ranges = field(default_factory=dict)
    caches: Mapping[str, AssignmentCache] = field(default_factory=dict)
    images: Tensor | None = None

    def run(
        self,
        evaluation: Evaluation,
        distributed: bool | dist.ProcessGroup = False,
        render: bool = True,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> Outcome:
        """The RSMs (shared among ranks), then scores, then images (``render``); each step ends
        with the ranks agreeing that it worked, so a fault on one rank never strands the
        others; a failure comes back in the outcome (also a cancellation: ``should_stop``
        turning True stops the RSMs at their next block of pairs)."""
        start = time.perf_counter()
        features, logits = evaluation.features, evaluation.logits
        outcome = Outcome(evaluation.epoch, evaluation.step, evaluation.log_step)
        semantic, outcome.failure = run_on_every_rank(
            lambda: self.semantic_rsms(features, distributed, progress, should_stop),
            distributed=distributed,
        )
        if outcome.failure is not None:
            return outcome
        scored, outcome.failure = run_on_every_rank(
            lambda: self.score(features, semantic, logits), distributed=distributed
        )
        if outcome.failure is not None:
            return outcome
        outcome.scores, outcome.rsms, outcome.layer_rsa = scored
        outcome.logits = logits
        outcome.scores["rsm/time_s"] = evaluation.seconds + time.perf_counter() - start
        if render:
            start = time.perf_counter()
            outcome.images, outcome.ranges = self.render(outcome)
            outcome.render_s = time.perf_counter() - start
        return outcome

    def semantic_rsms(
        self,
        features: Mapping[str, Tensor],
        distributed: bool | dist.ProcessGroup,
        progress: bool,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Tensor]:
        """The semantic RSM of each layer; a bar of pairs solved per layer when ``progress``;
        :class:`~lightning_rsm.functional.RSMCancelled` once ``should_stop`` returns True."""
        config = self.config
        return {
            layer: semantic_rsm(
                concepts,
                **config.rsm_options,
                num_workers=self.solver_threads,
                distributed=distributed,
                progress=progress and f"RSMMonitor {layer}",
                warm_start=self.caches.get(layer),
                should_stop=should_stop,
            )
            for layer, concepts in features.items()
        }

    def score(
        self, features: Mapping[str, Tensor], semantic: Mapping[str, Tensor], logits: Tensor | None
    ) -> tuple[dict[str, float], Rsms, Tensor]:
        """Scores of every RSM, the RSMs (float32, CPU) and the layer x layer RSA."""
        config = self.config
        output_similarity = None if logits is None else jensen_shannon_similarity(logits.double())
        scores: dict[str, float] = {}
        rsms: Rsms = {}
        for layer in config.layers:
            kinds = {"semantic": semantic[layer]}
            if config.baseline:
                kinds["baseline"] = spatio_semantic_rsm(
                    features[layer], kernel=config.kernel, sigma=config.sigma
                )
            rsms[layer] = kinds = {kind: rsm.float().cpu() for kind, rsm in kinds.items()}
            for kind, rsm in kinds.items():
                quality = rsm_scores(rsm, self.labels, output_similarity=output_similarity)
                scores.update({f"rsm/{layer}/{kind}/{k}": float(v) for k, v in quality.items()})
            scores.update(self.comparisons(layer, kinds["semantic"]))
        layer_rsa = rsa_matrix([kinds["semantic"] for kinds in rsms.values()], method=config.method)
        return scores, rsms, layer_rsa

    def comparisons(self, layer: str, rsm: Tensor) -> dict[str, float]:
        """RSA with the previous evaluation's RSM and with each target."""
        others = {f"vs_{name}": target for name, target in self.targets.items()}
        if layer in self.previous:
            others["rsa_to_previous"] = self.previous[layer]
        return {
            f"rsm/{layer}/{name}": float(compare_rsms(rsm, other, method=self.config.method))
            for name, other in others.items()
        }

    def render(self, outcome: Outcome) -> tuple[dict[str, np.ndarray], Ranges]:
        """The evaluation's figures rendered to RGB, and the colour ranges to hold (the callback
        keeps them): ``heatmap_range``, or each layer's
        :func:`~lightning_rsm.plotting.next_colour_range` of the range held so far."""
        n = next(iter(next(iter(outcome.rsms.values())).values())).shape[0]
        figures, ranges = evaluation_figures(
            outcome.rsms,
            self.labels,
            epoch=outcome.epoch,
            step=outcome.log_step,  # the step a logger shows the picture at
            previous_ranges=self.ranges,
            heatmap_range=self.config.heatmap_range,
            kernel=self.config.kernel,
            layer_rsa=outcome.layer_rsa,
            method=self.config.method,
            images=self.images,
            k=min(5, n - 1),
        )
        return {tag: figure_to_rgb(figure) for tag, figure in figures.items()}, ranges
