"""Shared parts of the metrics that accumulate representations and build a semantic RSM."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_rsm.functional.representations import _check_max_positions, to_concepts
from lightning_rsm.functional.rsm import _check_options, semantic_rsm


class _SemanticRSMBase(Metric):
    """Validates the RSM options once and turns stored concept sets into a semantic RSM.

    Representations are stored as concept sets ``(B, S, C)`` after optional pooling to
    ``max_positions``, so memory grows as N * S * C floats per stored representation.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        *,
        kernel: str = "cosine",
        matcher: str = "exact",
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        max_positions: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_options(kernel, matcher, sigma, window, tol)
        _check_max_positions(max_positions)
        self.kernel = kernel
        self.matcher = matcher
        self.sigma = sigma
        self.window = window
        self.tol = tol
        self.max_positions = max_positions

    def _concepts(self, x: Tensor, name: str, stored: list[Tensor] | Tensor) -> Tensor:
        """``x`` as detached concept sets, checked against what ``stored`` already holds."""
        concepts = to_concepts(x.detach(), max_positions=self.max_positions, name=name)
        if len(stored):
            s, c = (stored if isinstance(stored, Tensor) else stored[0]).shape[1:]
            if concepts.shape[1:] != (s, c):
                raise ValueError(
                    f"Expected `{name}` to give concept sets of shape (B, S, C) = (B, {s}, {c}) "
                    f"like the earlier updates, but got {tuple(concepts.shape)} from shape "
                    f"{tuple(x.shape)}."
                )
        return concepts

    def _semantic_rsm(self, stored: list[Tensor] | Tensor, name: str) -> Tensor:
        """Semantic RSM of all stored samples (all ranks' after synchronisation)."""
        if not len(stored):
            raise ValueError(
                f"Expected `{type(self).__name__}.update` to have been called with `{name}` "
                "before `compute`, but got no samples."
            )
        return semantic_rsm(
            dim_zero_cat(stored),
            kernel=self.kernel,
            matcher=self.matcher,
            sigma=self.sigma,
            window=self.window,
            tol=self.tol,
        )
