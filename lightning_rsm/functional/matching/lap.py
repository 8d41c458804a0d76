"""Exact linear assignment (LAP) for blocks of score matrices, cold or warm-started.

A Jonker-Volgenant solver (compiled with numba) for a batch of ``(S, S)`` score matrices,
maximising ``sum_s scores[s, P(s)]``. Internally it minimises the cost ``c = -scores`` with row
duals ``u`` and column duals ``v``; a solution is optimal when the duals are feasible
(``u_i + v_j <= c_ij`` everywhere) and every assigned edge is tight (``u_i + v_j = c_ij``).

Cold solve (Jonker & Volgenant, 1987): column reduction with reduction transfer, two passes of
augmenting row reduction (capped at a few steps per row: on near ties it cycles), then a
shortest augmenting path (Dijkstra on the dense reduced costs) for every row still free.

Warm solve, from a previous solution's column duals ``v`` and assignment (a permutation): the
row duals ``u_i = min_j (c_ij - v_j)`` make *any* ``v`` dual-feasible, so every row whose
previous column is still tight (its reduced cost is the row minimum) keeps it. A row whose old
edge is off by a gap keeps it too when raising that column's dual by the gap leaves every kept
row's reduced costs non-negative (kept edges stay tight, the duals stay feasible); otherwise the
column's dual is raised as far as the kept rows allow, which shortens the paths to it. Only the
other rows are re-assigned, as in the cold solve. An assignment that is not a permutation, duals
that are not finite or far off the problem's scale (where rounding could hurt), or an old
solution far from optimal (judged on the first rows already, so that a hopeless start costs a
small part of one pass over the scores) are ignored: that matrix is solved cold.

Every warm solve ends with a certificate that depends on the current scores alone: with row
duals that make every assigned edge tight, no reduced cost may fall below minus a rounding
tolerance of ``max |score|`` (and the duals' spread stays within ``4 S max |score|``); a matrix
that fails it is solved again, cold. So the result is the exact optimum whatever the previous
solution was; a good one only makes it cheaper. The certificate is one pass over the scores that
the compiler vectorises (about a tenth of a warm solve of the demo's layers).

Exact means as exact as a floating-point solve can be: the duals are first shifted by a constant
(which changes nothing but rounding) so that their largest is 0, and an old edge whose reduced
cost is off by rounding only (16 ulps of ``|score|`` plus the duals' spread) counts as tight, so
a solution carried over unchanged is not re-solved; the certificate bounds the value's distance
from the optimum by ``S * 32 * eps * (1 + 4 S) * max |score|`` (about ``2e-9`` of
``max |score|`` at S = 64, far less in practice: warm and cold values agree to about 1e-13), the
order of the rounding of any cold solve (scipy's included). Values are summed row by row in a
fixed order.

:class:`AssignmentCache` keeps the solutions of every pair of an RSM between evaluations, so
``semantic_rsm(..., warm_start=cache)`` solves each pair from its previous solution.

Without numba (not importable) the solver falls back to scipy's ``linear_sum_assignment``;
warm starts are then ignored (scipy returns no duals), results are the same.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from lightning_rsm.functional.checks import check_scores
from lightning_rsm.functional.matching.assignment import Assignment
from lightning_rsm.functional.matching.jonker_volgenant import HAVE_NUMBA, _solve_batch

_BACKENDS = ("numba", "scipy")


def _scipy_batch(scores: np.ndarray, values: np.ndarray, assign: np.ndarray | None) -> None:
    """Cold fallback: scipy's ``linear_sum_assignment`` per matrix, value summed in row order."""
    for b, matrix in enumerate(scores):
        cols = linear_sum_assignment(matrix, maximize=True)[1]
        values[b] = sum(matrix[np.arange(len(cols)), cols].tolist())
        if assign is not None:
            assign[b] = cols


def solve_into(
    scores: np.ndarray,
    slots: np.ndarray,
    warm: np.ndarray,
    assign: np.ndarray,
    duals: np.ndarray,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve C-contiguous float32/64 ``scores`` (B, S, S); warm from/into rows of assign/duals.

    ``slots[b]`` is the row of ``assign``/``duals`` that holds matrix b's solution (-1: none),
    used as the start where ``warm[b]``. Returns ``(values (B,), rows (B, 3))``: the two
    counts of :attr:`Assignment.rows`, then 1 where a warm start was tried but the matrix
    was solved cold. Without numba the solves are cold (scipy) and nothing is stored.
    """
    batch = scores.shape[0]
    values = np.empty(batch, dtype=np.float64)
    rows = np.empty((batch, 3), dtype=np.int64)
    if _resolve_backend(backend) == "scipy":
        _scipy_batch(scores, values, None)
        rows[:, 0], rows[:, 1], rows[:, 2] = scores.shape[1], 0, 0
        return values, rows
    _solve_batch(scores, slots, warm, assign, duals, values, rows)
    n_bad = int(np.isnan(values).sum())
    if n_bad:
        raise ValueError(f"Expected `scores` to be finite, but got {n_bad} matrices with NaN/Inf.")
    return values, rows


def cold_solve(scores: np.ndarray, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal values ``(B,)`` and assignments ``(B, S)`` of finite real ``scores`` (B, S, S),
    solved cold (numba, else scipy)."""
    array = np.ascontiguousarray(scores, dtype=np.float64)
    values, assign, _, _ = _solve(array, None, _resolve_backend(backend))
    return values, assign


def _resolve_backend(backend: object) -> str:
    if backend is None:
        return "numba" if HAVE_NUMBA else "scipy"
    if backend not in _BACKENDS:
        raise ValueError(
            f"Expected `backend` to be one of {sorted(_BACKENDS)} or None, but got {backend!r}."
        )
    if backend == "numba" and not HAVE_NUMBA:
        raise ValueError("Expected numba to be importable with `backend='numba'`, but it is not.")
    return backend


#: The former name of :class:`Assignment` (fields ``value, assignment, duals, rows`` of NumPy
#: arrays then), kept importable.
LapResult = Assignment


def _solve(
    array: np.ndarray, prior: tuple[np.ndarray, np.ndarray] | None, backend: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Solve finite C-contiguous float64 ``array`` (B, S, S), warm from ``prior`` (assignment,
    duals) if given; returns the values, assignments, column duals and the two row counts."""
    batch, size = array.shape[:2]
    values = np.empty(batch, dtype=np.float64)
    assign = np.empty((batch, size), dtype=np.int64)
    if backend == "scipy":
        _scipy_batch(array, values, assign)
        rows = np.zeros((batch, 2), dtype=np.int64)
        rows[:, 0] = size
        return values, assign, np.full((batch, size), np.nan), rows
    dual = np.zeros((batch, size), dtype=np.float64)
    if prior is not None:
        assign[:] = np.clip(prior[0], -1, size).astype(np.int64)
        dual[:] = prior[1].astype(np.float64)
    rows = np.empty((batch, 3), dtype=np.int64)
    slots = np.arange(batch, dtype=np.int64)
    _solve_batch(array, slots, np.full(batch, prior is not None), assign, dual, values, rows)
    return values, assign, dual, rows[:, :2].copy()


def linear_assignment_batch(
    scores: Tensor | np.ndarray,
    *,
    assignment: Tensor | np.ndarray | None = None,
    duals: Tensor | np.ndarray | None = None,
    backend: str | None = None,
) -> Assignment:
    """Exact maximum-score assignment of each of B score matrices, optionally warm-started.

    Jonker-Volgenant (column reduction, augmenting row reduction, shortest augmenting paths),
    compiled with numba and run without the GIL. Given a previous solution's ``assignment`` and
    ``duals`` (e.g. of a slightly different problem), each row whose previous column is still
    tight, or can be made tight by raising that column's dual, keeps it and only the other rows
    are re-assigned; the result is exact either way (see the module notes on rounding).

    .. note:: Solves on CPU (results go back to the device of ``scores``); the first call
        compiles the solver (about 2 s, cached on disk).

    Args:
        scores: real tensor (or NumPy array) of shape ``(B, S, S)``; ``scores[b, s, t]`` is the
            gain of assigning row ``s`` to column ``t``.
        assignment: optional previous solution, integer ``(B, S)`` (e.g. a previous result's
            ``permutation``); needs ``duals``.
        duals: optional previous column duals, float ``(B, S)``; needs ``assignment``.
        backend: ``"numba"``, ``"scipy"`` (cold only: warm starts are ignored, duals are NaN)
            or None for numba when importable, else scipy.

    Returns:
        :class:`~lightning_rsm.functional.matching.assignment.Assignment` with ``upper ==
        value``, the column ``duals`` (warm-start state) and the ``rows`` counts, on the device
        of ``scores`` (CPU for an array).

    Raises:
        TypeError: If ``scores`` is not a tensor or array of a real dtype.
        ValueError: If ``scores`` is not ``(B, S, S)`` with S >= 1 or holds NaN/Inf, only one of
            ``assignment`` and ``duals`` is given or either is not ``(B, S)``, or ``backend`` is
            unknown (or numba is missing for ``"numba"``).

    Example:
        >>> import torch
        >>> result = linear_assignment_batch(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]))
        >>> result.value, result.permutation
        (tensor([3.], dtype=torch.float64), tensor([[1, 0]]))
        >>> warm = linear_assignment_batch(torch.tensor([[[3.0, 1.5], [2.0, 0.0]]]),
        ...                                assignment=result.permutation, duals=result.duals)
        >>> warm.value, warm.rows  # the old solution is still optimal: no row re-assigned
        (tensor([3.5000], dtype=torch.float64), tensor([[0, 0]]))
    """
    backend = _resolve_backend(backend)
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    check_scores(scores)
    batch, size = scores.shape[:2]
    if (assignment is None) != (duals is None):
        raise ValueError(
            "Expected `assignment` and `duals` both or neither, "
            f"but got {'duals' if assignment is None else 'assignment'} missing."
        )
    prior = None
    if assignment is not None:
        prior = []
        for name, given in (("assignment", assignment), ("duals", duals)):
            if isinstance(given, Tensor):
                given = given.detach().cpu().numpy()
            given = np.asarray(given)
            if given.shape != (batch, size):
                raise ValueError(
                    f"Expected `{name}` of shape {(batch, size)}, but got shape {given.shape}."
                )
            prior.append(given)
        prior = tuple(prior)
    array = np.ascontiguousarray(scores.detach().cpu().double().numpy())
    values, assign, dual, rows = _solve(array, prior, backend)
    value = torch.from_numpy(values).to(scores.device)
    return Assignment(
        value,
        value.clone(),
        torch.from_numpy(assign).to(scores.device),
        torch.from_numpy(dual).to(scores.device),
        torch.from_numpy(rows).to(scores.device),
    )
