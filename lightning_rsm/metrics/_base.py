"""Shared parts of the metrics that accumulate representations and build a semantic RSM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS, check_rsm_options
from lightning_rsm.functional.representations import to_concepts
from lightning_rsm.functional.rsm import semantic_rsm


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
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_rsm_options(kernel, matcher, sigma, window, tol, max_positions)
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
            distributed=self._split_across_ranks(),
        )

    def _split_across_ranks(self) -> bool:
        """Share the RSM's work among the ranks only when every rank holds the same, gathered
        samples (inside a synchronised ``compute`` on the default process group)."""
        return (
            self._is_synced
            and self.process_group is None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any = None) -> None:
        """Give a rank that stored nothing empty states shaped like the other ranks' states.

        torchmetrics sends an empty 1D float tensor for an empty list state, which cannot be
        gathered with the ``(n, S, C)`` features or the integer labels of the other ranks.
        """
        group = process_group or self.process_group
        local = {
            name: (tuple(value[0].shape[1:]), value[0].dtype) if len(value) else None
            for name, value in ((name, getattr(self, name)) for name in self._reductions)
            if isinstance(value, list)
        }
        everyone: list[dict] = [{} for _ in range(dist.get_world_size(group))]
        dist.all_gather_object(everyone, local, group=group)
        for name, mine in local.items():
            found = next((theirs[name] for theirs in everyone if theirs[name] is not None), None)
            if mine is None and found is not None:
                trailing, dtype = found
                setattr(self, name, [torch.empty((0, *trailing), dtype=dtype, device=self.device)])
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)
