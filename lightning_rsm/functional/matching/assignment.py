"""The result every solver of :mod:`lightning_rsm.functional.matching` returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Assignment(NamedTuple):
    """Solutions of B assignment problems of size S: a permutation per problem and its bounds.

    For each score matrix ``scores[b]`` of shape ``(S, S)``::

        value[b] = sum_s scores[b, s, permutation[b, s]]  <=  optimum[b]  <=  upper[b]

    Exact solvers return ``upper == value``; approximate ones a certified upper bound, so
    :attr:`gap` bounds how far from the optimum ``value`` is. Tensors lie on the device of the
    scores (``duals`` and ``rows``: on CPU, where the exact solver runs).

    Example:
        >>> import torch
        >>> from lightning_rsm.functional import match_greedy
        >>> result = match_greedy(torch.tensor([[[3.0, 2.9], [2.9, 0.0]]]))
        >>> result.value, result.upper, result.permutation
        (tensor([3.], dtype=torch.float64), tensor([5.9000], dtype=torch.float64), tensor([[0, 1]]))
        >>> result.gap
        tensor([2.9000], dtype=torch.float64)
    """

    #: float64 ``(B,)``: the score of ``permutation``, a lower bound on the optimum.
    value: Tensor
    #: float64 ``(B,)``: an upper bound on the optimum (equal to ``value`` for exact solvers).
    upper: Tensor
    #: int64 ``(B, S)``: the column assigned to each row, a permutation of ``0..S-1``.
    permutation: Tensor
    #: float64 ``(B, S)``: optimal column duals of the cost ``-scores``, the state a warm start
    #: needs (:func:`~lightning_rsm.functional.matching.lap.linear_assignment_batch` only, NaN
    #: with its scipy backend); None from the other solvers.
    duals: Tensor | None = None
    #: int64 ``(B, 2)``: rows not kept from the warm start (S when solved cold), and rows that
    #: needed a shortest augmenting path (``linear_assignment_batch`` only); else None.
    rows: Tensor | None = None

    @property
    def gap(self) -> Tensor:
        """float64 ``(B,)``: ``upper - value``, at least ``value``'s distance from the optimum."""
        return self.upper - self.value
