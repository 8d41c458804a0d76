"""Kernels of an RSM from aligned inner products ``v_ij`` and squared norms, in float64.

cosine ``v / (|x| |y|)``; inner ``v``; rbf ``exp(-d2 / (2 sigma^2))`` with
``d2 = |x|^2 + |y|^2 - 2 v`` and, by default, the median heuristic for sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _squared_norms(concepts: Tensor) -> Tensor:
    """``||X_i||^2`` of each sample in float64, shape ``(N,)``."""
    return concepts.double().square().sum(dim=(1, 2))


def _squared_distances(values: Tensor, sq_x: Tensor, sq_y: Tensor, symmetric: bool) -> Tensor:
    """``|x|^2 + |y|^2 - 2 v``, clamped at 0 (and 0 on the diagonal when symmetric)."""
    d2 = (sq_x.unsqueeze(1) + sq_y.unsqueeze(0) - 2 * values).clamp_min(0.0)
    if symmetric:
        d2.fill_diagonal_(0.0)
    return d2


def _median_sigma(values: Tensor, sq_x: Tensor, sq_y: Tensor, symmetric: bool) -> float:
    """Median heuristic: sigma^2 is the median squared distance over the off-diagonal pairs
    (all pairs when not ``symmetric``), or 1 if that median is 0."""
    d2 = _squared_distances(values, sq_x, sq_y, symmetric)
    pool = d2[torch.triu_indices(*d2.shape, offset=1).unbind()] if symmetric else d2.flatten()
    sigma_sq = float(pool.median())
    return (sigma_sq if sigma_sq > 0 else 1.0) ** 0.5


def _apply_kernel(
    values: Tensor,
    sq_x: Tensor,
    sq_y: Tensor,
    kernel: str,
    sigma: float | None,
    symmetric: bool,
) -> Tensor:
    """Kernel matrix from aligned inner products ``values`` (N, M) and squared norms.

    cosine: ``v / (|x| |y|)``, 0 where a norm is 0. rbf: ``exp(-d2 / (2 sigma^2))`` with
    ``d2 = |x|^2 + |y|^2 - 2 v`` and ``sigma`` from :func:`_median_sigma` when None.
    """
    if kernel == "inner":
        return values
    if kernel == "cosine":
        denom = (sq_x.unsqueeze(1) * sq_y.unsqueeze(0)).sqrt()
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, values / safe, torch.zeros_like(values)).clamp(-1.0, 1.0)
    if sigma is None:
        sigma = _median_sigma(values, sq_x, sq_y, symmetric)
    d2 = _squared_distances(values, sq_x, sq_y, symmetric)
    return torch.exp(-d2 / (2 * float(sigma) ** 2))
