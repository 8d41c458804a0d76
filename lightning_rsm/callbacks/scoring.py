"""What one evaluation of :class:`~lightning_rsm.callbacks.RSMMonitor` computes from the probe's
features: the semantic RSMs (their work shared among ranks), their scores, the layer x layer RSA
and the heatmaps.

A :class:`Scoring` holds everything the computation reads (the options, the probe's labels, the
previous evaluation's RSMs, the colour ranges fixed so far), taken when the evaluation is handed
off, so nothing here reads the callback while training goes on. Nothing here imports Lightning:
the same code runs in the hook (``background=False``) and on the background worker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.distributed as dist
from torch import Tensor

from lightning_rsm.callbacks.background import Evaluation, Outcome, Rsms
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
from lightning_rsm.plotting import default_colour_range, rsm_images

Ranges = dict[str, tuple[float, float]]


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
class Scoring:
    """The RSM and score options of the callback and the state one evaluation compares against.

    Attributes:
        layers: the monitored layers, in the order given.
        previous: the previous evaluation's semantic RSM per layer (for ``rsa_to_previous``).
        ranges: the colour ranges fixed by earlier evaluations, per layer.
        num_workers: solver threads of :func:`~lightning_rsm.functional.semantic_rsm`.
        caches: each layer's warm-start cache (exact matcher); used by one evaluation at a time.
    """

    layers: Sequence[str]
    kernel: str
    matcher: str
    sigma: float | None
    window: int
    tol: float
    baseline: bool
    method: str
    targets: Mapping[str, Tensor]
    labels: Tensor | None
    heatmap_range: tuple[float, float] | None
    num_workers: int | None
    previous: Mapping[str, Tensor] = field(default_factory=dict)
    ranges: Ranges = field(default_factory=dict)
    caches: Mapping[str, AssignmentCache] = field(default_factory=dict)

    def compute(
        self,
        evaluation: Evaluation,
        distributed: bool | dist.ProcessGroup,
        render: bool,
        progress: bool = False,
    ) -> Outcome:
        """The RSMs (shared among ranks), then scores, then images (``render``); each step ends
        with the ranks agreeing that it worked, so a fault on one rank never strands the
        others; a failure comes back in the outcome."""
        start = time.perf_counter()
        features, logits = evaluation.features, evaluation.logits
        outcome = Outcome(evaluation.epoch, evaluation.step)
        semantic, outcome.failure = run_on_every_rank(
            lambda: self.semantic_rsms(features, distributed, progress), distributed=distributed
        )
        if outcome.failure is not None:
            return outcome
        scored, outcome.failure = run_on_every_rank(
            lambda: self.score(features, semantic, logits), distributed=distributed
        )
        if outcome.failure is not None:
            return outcome
        outcome.scores, outcome.rsms, outcome.layer_rsa = scored
        outcome.scores["rsm/time_s"] = evaluation.seconds + time.perf_counter() - start
        if render:
            outcome.images, outcome.ranges = self.render(outcome.rsms, outcome.layer_rsa)
        return outcome

    def semantic_rsms(
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
                num_workers=self.num_workers,
                distributed=distributed,
                progress=progress and f"RSMMonitor {layer}",
                warm_start=self.caches.get(layer),
            )
            for layer, concepts in features.items()
        }

    def score(
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
                quality = rsm_scores(rsm, self.labels, output_similarity=output_similarity)
                scores.update({f"rsm/{layer}/{kind}/{k}": float(v) for k, v in quality.items()})
            scores.update(self.comparisons(layer, kinds["semantic"]))
        layer_rsa = rsa_matrix([kinds["semantic"] for kinds in rsms.values()], method=self.method)
        return scores, rsms, layer_rsa

    def comparisons(self, layer: str, rsm: Tensor) -> dict[str, float]:
        """RSA with the previous evaluation's RSM and with each target."""
        others = {f"vs_{name}": target for name, target in self.targets.items()}
        if layer in self.previous:
            others["rsa_to_previous"] = self.previous[layer]
        return {
            f"rsm/{layer}/{name}": float(compare_rsms(rsm, other, method=self.method))
            for name, other in others.items()
        }

    def render(self, rsms: Rsms, layer_rsa: Tensor | None) -> tuple[dict[str, np.ndarray], Ranges]:
        """The heatmaps and the colour ranges they use (the callback keeps the new ones)."""
        ranges = {layer: self.colour_range(layer, kinds) for layer, kinds in rsms.items()}
        return rsm_images(rsms, self.labels, ranges, layer_rsa), ranges

    def colour_range(self, layer: str, kinds: Mapping[str, Tensor]) -> tuple[float, float]:
        """``heatmap_range``, or the layer's range fixed at its first evaluation."""
        if self.heatmap_range is not None:
            return self.heatmap_range
        if layer in self.ranges:
            return self.ranges[layer]
        return default_colour_range(self.kernel, list(kinds.values()))
