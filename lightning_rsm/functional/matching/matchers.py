"""Linear assignment (LAP) solvers for blocks of pairwise score matrices.

Every matcher takes a block of score matrices ``scores`` of shape ``(B, S, S)`` (``scores[b, s, t]``
is the inner product of concept vector ``s`` of one sample with concept vector ``t`` of the other)
and returns an :class:`~lightning_rsm.functional.matching.assignment.Assignment`: per problem, a
feasible permutation ``P``, its value and an upper bound on the optimum::

    value[b] = sum_s scores[b, s, P(s)]  <=  max_P sum_s scores[b, s, P(s)]  <=  upper[b]

For the exact matcher ``value == upper``. The approximations return a feasible permutation, so
their value is a lower bound on the optimum; their upper bound is the smaller of the sum of row
maxima and the sum of column maxima, so ``upper - value`` bounds how far from exact a result is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightning_rsm.functional.checks import check_scores
from lightning_rsm.functional.matching.assignment import Assignment
from lightning_rsm.functional.matching.lap import cold_solve, linear_assignment_batch


def assignment_upper_bound(scores: Tensor) -> Tensor:
    """Cheap upper bound on the optimal assignment value of each score matrix.

    Every permutation takes one entry per row and one per column, so neither its value can
    exceed the sum of row maxima nor the sum of column maxima.

    Args:
        scores: real tensor of shape ``(B, S, S)``.

    Returns:
        float64 tensor of shape ``(B,)``: ``min(sum of row maxima, sum of column maxima)``.

    Raises:
        TypeError: If ``scores`` is not a tensor of a real dtype.
        ValueError: If ``scores`` is not of shape ``(B, S, S)`` with S >= 1 or holds NaN/Inf.

    Example:
        >>> import torch
        >>> assignment_upper_bound(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))
        tensor([4.], dtype=torch.float64)
    """
    check_scores(scores)
    return _upper_bound(scores)


def _upper_bound(scores: Tensor) -> Tensor:
    s = scores.double()
    return torch.minimum(s.amax(dim=2).sum(dim=1), s.amax(dim=1).sum(dim=1))


def match_exact(scores: Tensor) -> Assignment:
    """Optimal assignment of each score matrix with a Jonker-Volgenant solver.

    The ``"exact"`` matcher of :func:`~lightning_rsm.functional.semantic_rsm`: a cold
    :func:`~lightning_rsm.functional.matching.lap.linear_assignment_batch` of a tensor.

    .. note:: The solve runs on CPU, compiled with numba, or with scipy's
        ``linear_sum_assignment`` when numba is not importable; both release the GIL, so
        several threads can solve different blocks at once. The result is returned on the
        input's device.

    Args:
        scores: real tensor of shape ``(B, S, S)``.

    Returns:
        :class:`~lightning_rsm.functional.matching.assignment.Assignment`: ``value == upper``
        (float64 ``(B,)``), an optimal ``permutation`` ``(B, S)``, the column ``duals`` and
        ``rows`` counts of the solve.

    Raises:
        TypeError: If ``scores`` is not a tensor of a real dtype.
        ValueError: If ``scores`` is not of shape ``(B, S, S)`` with S >= 1 or holds NaN/Inf.

    References:
        R. Jonker and A. Volgenant, "A shortest augmenting path algorithm for dense and sparse
        linear assignment problems", Computing 38(4), 1987. https://doi.org/10.1007/BF02278710

        D. F. Crouse, "On implementing 2D rectangular assignment algorithms", IEEE Transactions
        on Aerospace and Electronic Systems 52(4), 2016. https://doi.org/10.1109/TAES.2016.140952

    Example:
        >>> import torch
        >>> result = match_exact(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))
        >>> result.value, result.permutation
        (tensor([3.], dtype=torch.float64), tensor([[1, 0]]))
    """
    return linear_assignment_batch(scores)


def match_windowed(scores: Tensor, norms_x: Tensor, norms_y: Tensor, window: int = 8) -> Assignment:
    """Windowed approximation: match concept vectors only within windows of equal norm rank.

    Each sample's concept vectors are sorted by norm (descending); the first ``window`` vectors
    of one sample are matched optimally to the first ``window`` of the other, the next
    ``window`` to the next, and so on. The result is a feasible permutation, so the value is a
    **lower bound** on the exact one; ``upper`` is :func:`assignment_upper_bound`.

    Args:
        scores: real tensor of shape ``(B, S, S)``.
        norms_x: norms of the row sample's concept vectors, shape ``(B, S)``.
        norms_y: norms of the column sample's concept vectors, shape ``(B, S)``.
        window: positive window size; ``window >= S`` is the exact matcher.

    Returns:
        :class:`~lightning_rsm.functional.matching.assignment.Assignment`: ``value`` and
        ``upper`` (float64 ``(B,)``) and the ``permutation`` ``(B, S)``.

    Raises:
        TypeError: If ``scores`` is not a tensor of a real dtype.
        ValueError: If ``scores`` is not of shape ``(B, S, S)`` with S >= 1 or holds NaN/Inf.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[[3.0, 1.0], [2.0, 0.0]]])
        >>> result = match_windowed(
        ...     scores, torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 2.0]]), window=1
        ... )
        >>> result.value, result.upper, result.permutation  # 1 + 2: the optimum 3 + 0 by chance
        (tensor([3.], dtype=torch.float64), tensor([4.], dtype=torch.float64), tensor([[1, 0]]))
    """
    check_scores(scores)
    order_x = norms_x.argsort(dim=1, descending=True, stable=True)
    order_y = norms_y.argsort(dim=1, descending=True, stable=True)
    sorted_scores = scores.gather(1, order_x.unsqueeze(2).expand_as(scores))
    sorted_scores = sorted_scores.gather(2, order_y.unsqueeze(1).expand_as(scores))
    matrices = sorted_scores.detach().double().cpu().numpy()
    batch, size = matrices.shape[:2]
    values = np.zeros(batch, dtype=np.float64)
    sorted_columns = np.empty((batch, size), dtype=np.int64)  # in norm-rank order
    for start in range(0, size, window):
        stop = min(start + window, size)
        part, columns = cold_solve(matrices[:, start:stop, start:stop])
        values += part
        sorted_columns[:, start:stop] = columns + start
    columns = order_y.gather(1, torch.from_numpy(sorted_columns).to(order_y.device))
    permutation = torch.empty_like(columns).scatter_(1, order_x, columns)
    return Assignment(
        torch.from_numpy(values).to(scores.device),
        _upper_bound(scores),
        permutation.to(scores.device),
    )


def match_greedy(scores: Tensor) -> Assignment:
    """Greedy approximation: repeatedly take the largest remaining entry, batched in torch.

    Runs wherever ``scores`` lives (CPU or CUDA) with S vectorised steps and no loop per pair.
    The result is a feasible permutation, so the value is a **lower bound** on the exact one;
    ``upper`` is :func:`assignment_upper_bound`.

    Args:
        scores: real tensor of shape ``(B, S, S)``.

    Returns:
        :class:`~lightning_rsm.functional.matching.assignment.Assignment`: ``value`` and
        ``upper`` (float64 ``(B,)``) and the ``permutation`` ``(B, S)``.

    Raises:
        TypeError: If ``scores`` is not a tensor of a real dtype.
        ValueError: If ``scores`` is not of shape ``(B, S, S)`` with S >= 1 or holds NaN/Inf.

    Example:
        >>> import torch
        >>> result = match_greedy(torch.tensor([[[3.0, 2.9], [2.9, 0.0]]]))
        >>> result.value, result.upper, result.permutation
        (tensor([3.], dtype=torch.float64), tensor([5.9000], dtype=torch.float64), tensor([[0, 1]]))
    """
    check_scores(scores)
    batch, size, _ = scores.shape
    work = scores.detach().double().clone()
    values = torch.zeros(batch, dtype=torch.float64, device=scores.device)
    permutation = torch.empty(batch, size, dtype=torch.long, device=scores.device)
    rows = torch.arange(batch, device=scores.device)
    for _ in range(size):
        best = work.flatten(1).argmax(dim=1)
        i, j = best // size, best % size
        values += scores[rows, i, j].double()
        permutation[rows, i] = j
        work[rows, i, :] = -torch.inf
        work[rows, :, j] = -torch.inf
    return Assignment(values, _upper_bound(scores), permutation)
