"""Linear assignment (LAP) solvers for blocks of pairwise score matrices.

Every matcher takes a block of score matrices ``scores`` of shape ``(B, S, S)`` (``scores[b, s, t]``
is the inner product of concept vector ``s`` of one sample with concept vector ``t`` of the other)
and returns, per problem, the value of a feasible permutation and an upper bound on the optimum::

    value[b] = sum_s scores[b, s, P(s)]  <=  max_P sum_s scores[b, s, P(s)]  <=  upper[b]

For the exact matcher ``value == upper``. The approximations return a feasible permutation, so
their value is a lower bound on the optimum; their upper bound is the smaller of the sum of row
maxima and the sum of column maxima, so ``upper - value`` bounds how far from exact a result is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_rsm.functional.matching.lap import cold_values

MatchResult = tuple[Tensor, Tensor]


def _check_scores(scores: object) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"Expected `scores` to be a torch.Tensor, but got {type(scores).__name__}.")
    if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(
            f"Expected `scores` to be a block of square matrices of shape (B, S, S), "
            f"but got shape {tuple(scores.shape)}."
        )
    if not scores.is_floating_point():
        raise TypeError(f"Expected `scores` to have a floating dtype, but got {scores.dtype}.")
    n_bad = int((~torch.isfinite(scores)).sum())
    if n_bad:
        raise ValueError(f"Expected `scores` to be finite, but got {n_bad} NaN/Inf values.")


def assignment_upper_bound(scores: Tensor) -> Tensor:
    """Cheap upper bound on the optimal assignment value of each score matrix.

    Every permutation takes one entry per row and one per column, so neither its value can
    exceed the sum of row maxima nor the sum of column maxima.

    Args:
        scores: tensor of shape ``(B, S, S)``.

    Returns:
        float64 tensor of shape ``(B,)``: ``min(sum of row maxima, sum of column maxima)``.

    Example:
        >>> import torch
        >>> assignment_upper_bound(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))
        tensor([4.], dtype=torch.float64)
    """
    s = scores.double()
    return torch.minimum(s.amax(dim=2).sum(dim=1), s.amax(dim=1).sum(dim=1))


def match_exact(scores: Tensor) -> MatchResult:
    """Optimal assignment of each score matrix with a Jonker-Volgenant solver.

    .. note:: The solve runs on CPU, compiled with numba
        (:func:`~lightning_rsm.functional.matching.lap.linear_assignment_batch`), or with scipy's
        ``linear_sum_assignment`` when numba is not importable; both release the GIL, so
        several threads can solve different blocks at once. The result is returned on the
        input's device.

    Args:
        scores: tensor of shape ``(B, S, S)``.

    Returns:
        ``(value, upper)``, float64 tensors of shape ``(B,)``; equal for this matcher.

    References:
        D. F. Crouse, "On implementing 2D rectangular assignment algorithms", IEEE Transactions
        on Aerospace and Electronic Systems 52(4), 2016. https://doi.org/10.1109/TAES.2016.140952

    Example:
        >>> import torch
        >>> match_exact(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))[0]
        tensor([3.], dtype=torch.float64)
    """
    _check_scores(scores)
    values = torch.from_numpy(cold_values(scores.detach().double().cpu().numpy()))
    values = values.to(scores.device)
    return values, values.clone()


def match_windowed(
    scores: Tensor, norms_x: Tensor, norms_y: Tensor, window: int = 8
) -> MatchResult:
    """Windowed approximation: match concept vectors only within windows of equal norm rank.

    Each sample's concept vectors are sorted by norm (descending); the first ``window`` vectors
    of one sample are matched optimally to the first ``window`` of the other, the next
    ``window`` to the next, and so on. The result is a feasible permutation, so the value is a
    **lower bound** on the exact one; ``upper`` is :func:`assignment_upper_bound`.

    Args:
        scores: tensor of shape ``(B, S, S)``.
        norms_x: norms of the row sample's concept vectors, shape ``(B, S)``.
        norms_y: norms of the column sample's concept vectors, shape ``(B, S)``.
        window: positive window size; ``window >= S`` is the exact matcher.

    Returns:
        ``(value, upper)``, float64 tensors of shape ``(B,)``.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[[3.0, 1.0], [2.0, 0.0]]])
        >>> match_windowed(scores, torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 2.0]]), window=1)
        (tensor([3.], dtype=torch.float64), tensor([4.], dtype=torch.float64))
    """
    _check_scores(scores)
    order_x = norms_x.argsort(dim=1, descending=True, stable=True)
    order_y = norms_y.argsort(dim=1, descending=True, stable=True)
    sorted_scores = scores.gather(1, order_x.unsqueeze(2).expand_as(scores))
    sorted_scores = sorted_scores.gather(2, order_y.unsqueeze(1).expand_as(scores))
    matrices = sorted_scores.detach().double().cpu().numpy()
    size = matrices.shape[1]
    values = np.zeros(matrices.shape[0], dtype=np.float64)
    for start in range(0, size, window):
        stop = min(start + window, size)
        values += cold_values(np.ascontiguousarray(matrices[:, start:stop, start:stop]))
    return torch.from_numpy(values).to(scores.device), assignment_upper_bound(scores)


def match_greedy(scores: Tensor) -> MatchResult:
    """Greedy approximation: repeatedly take the largest remaining entry, batched in torch.

    Runs wherever ``scores`` lives (CPU or CUDA) with S vectorised steps and no loop per pair.
    The result is a feasible permutation, so the value is a **lower bound** on the exact one;
    ``upper`` is :func:`assignment_upper_bound`.

    Args:
        scores: tensor of shape ``(B, S, S)``.

    Returns:
        ``(value, upper)``, float64 tensors of shape ``(B,)``.

    Example:
        >>> import torch
        >>> match_greedy(torch.tensor([[[3.0, 2.9], [2.9, 0.0]]]))
        (tensor([3.], dtype=torch.float64), tensor([5.9000], dtype=torch.float64))
    """
    _check_scores(scores)
    batch, size, _ = scores.shape
    work = scores.detach().double().clone()
    values = torch.zeros(batch, dtype=torch.float64, device=scores.device)
    rows = torch.arange(batch, device=scores.device)
    for _ in range(size):
        best = work.flatten(1).argmax(dim=1)
        i, j = best // size, best % size
        values += scores[rows, i, j].double()
        work[rows, i, :] = -torch.inf
        work[rows, :, j] = -torch.inf
    return values, assignment_upper_bound(scores)
