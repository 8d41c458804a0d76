"""Exact linear assignment (LAP) for blocks of score matrices, cold or warm-started.

A Jonker-Volgenant solver (compiled with numba) for a batch of ``(S, S)`` score matrices,
maximising ``sum_s scores[s, P(s)]``. Internally it minimises the cost ``c = -scores`` with row
duals ``u`` and column duals ``v``; a solution is optimal when the duals are feasible
(``u_i + v_j <= c_ij`` everywhere) and every assigned edge is tight (``u_i + v_j = c_ij``).

Cold solve (Jonker & Volgenant, 1987): column reduction with reduction transfer, two passes of
augmenting row reduction, then a shortest augmenting path (Dijkstra on the dense reduced costs)
for every row still free.

Warm solve, from a previous solution's column duals ``v`` and assignment: the row duals
``u_i = min_j (c_ij - v_j)`` make *any* ``v`` dual-feasible, so every row whose previous column
is still tight (its reduced cost is the row minimum) keeps it. A row whose old edge is off by a
gap keeps it too when raising that column's dual by the gap leaves every kept row's reduced
costs non-negative (kept edges stay tight, the duals stay feasible); otherwise the column's dual
is raised as far as the kept rows allow, which shortens the paths to it. Only the other rows are
re-assigned: augmenting row reduction (capped at a few steps per row: on near ties it can cycle),
then shortest paths. Duals that are not finite or far off the
problem's scale (where rounding could hurt), or an old solution far from optimal, are ignored:
that matrix is solved cold.

Every warm solve ends with a certificate that depends on the current scores alone: with
``u_i = min_j (c_ij - v_j)`` every assigned edge must be tight within a rounding tolerance of
``max |score|`` (and the duals' spread within ``4 S max |score|``); a matrix that fails it is
solved again, cold. So the result is the exact optimum whatever the previous solution was; a
good one only makes it cheaper.

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
from lightning_rsm.functional.matching.jonker_volgenant import (
    HAVE_NUMBA,
    NOT_FINITE,
    SOLVE_COLD,
    UNASSIGNED,
    _augmenting_row_reduction,
    _certified,
    _cold_start,
    _njit,
    _shortest_path,
    _unassign,
    _warm_start,
)

_BACKENDS = ("numba", "scipy")
# Passes of augmenting row reduction (JV's choice) before the shortest paths.
_ARR_PASSES = 2
# After a warm start a pass of ARR stops lowering duals after this many steps per free row (JV:
# up to S per free row). On near ties (a ViT's patch tokens late in AdamW training) ARR cycled
# through rows swapping columns, and a warm solve cost nearly a cold one; capped, the rows left
# take shortest paths. Measured on solves warm-started from the previous epoch, per pair (the
# table in benchmarks/README.md): the ViT 1.1-4.2x faster than cold (1.0-2.0x uncapped), the
# demo CNN's layers and drifting random matrices as fast as uncapped (2.5-3.8x, 2.5-3.2x).
_WARM_ARR_STEPS = 8


# The batch driver, compiled like the kernels it calls.
@_njit
def _solve_from(scores, warm, x0, v0, x, y, v, u, free, d, cols, pred):
    """Solve one ``(S, S)`` matrix of ``scores`` (the costs are their negatives) into x, y, v,
    warm from ``x0, v0`` where ``warm`` and the warm start is usable, else cold.

    Returns ``(rows not kept from the warm start (S when solved cold), rows that needed a
    shortest path, whether it was solved warm)``; the counts are -1 if ``scores`` hold NaN/Inf.
    """
    n = scores.shape[0]
    n_free = SOLVE_COLD
    if warm:
        _unassign(x, y)
        n_free = _warm_start(scores, x0, v0, x, y, v, u, free)
    if n_free == SOLVE_COLD:
        _unassign(x, y)
        n_free = _cold_start(scores, x, y, v, free)
        warm = False
    if n_free == NOT_FINITE:
        return -1, -1, warm
    not_kept = n_free if warm else n
    for _ in range(_ARR_PASSES):
        if n_free == 0:
            break
        budget = _WARM_ARR_STEPS * n_free if warm else n * n
        n_free = _augmenting_row_reduction(scores, free, n_free, x, y, v, budget)
    for f in range(n_free):
        start = free[f]
        j = _shortest_path(scores, start, x, y, v, d, cols, pred)
        i = UNASSIGNED
        while i != start:
            i = pred[j]
            y[j] = i
            k = x[i]
            x[i] = j
            j = k
    return not_kept, n_free, warm


@_njit
def _solve_one(scores, warm, x0, v0, x, y, v, u, free, d, cols, pred, stats):
    """:func:`_solve_from`, then, for a warm solve, the optimality certificate of the result on
    the current scores alone (:func:`_certified`); a matrix that fails it is solved cold.

    Writes to ``stats``: rows not kept, rows that needed a shortest path, and 1 where a warm
    start was tried but the matrix was solved cold (start unusable or certificate failed).
    Returns False if ``scores`` hold NaN/Inf.
    """
    not_kept, paths, solved_warm = _solve_from(
        scores, warm, x0, v0, x, y, v, u, free, d, cols, pred
    )
    if solved_warm and not_kept >= 0 and not _certified(scores, x, y, v):
        not_kept, paths, solved_warm = _solve_from(
            scores, False, x0, v0, x, y, v, u, free, d, cols, pred
        )
    fell_back = warm and not solved_warm
    stats[0] = not_kept
    stats[1] = paths
    stats[2] = 1 if fell_back else 0
    return not_kept >= 0


@_njit
def _solve_batch(scores, slots, warm, assign, duals, values, stats):
    """Solve ``scores[b]`` for every b; warm from ``assign/duals[slots[b]]`` where ``warm[b]``.

    Writes the optimal value to ``values[b]`` (NaN if the matrix holds NaN/Inf), the row counts
    to ``stats[b]`` and, where ``slots[b] >= 0``, the assignment and column duals to
    ``assign/duals[slots[b]]``.
    """
    n = scores.shape[1]
    x = np.empty(n, dtype=np.int64)
    y = np.empty(n, dtype=np.int64)
    v = np.empty(n, dtype=np.float64)
    u = np.empty(n, dtype=np.float64)
    x0 = np.empty(n, dtype=np.int64)
    v0 = np.empty(n, dtype=np.float64)
    free = np.empty(n, dtype=np.int64)
    d = np.empty(n, dtype=np.float64)
    cols = np.empty(n, dtype=np.int64)
    pred = np.empty(n, dtype=np.int64)
    for b in range(scores.shape[0]):
        matrix = scores[b]
        slot = slots[b]
        use = warm[b] and slot >= 0
        if n == 1:  # also keeps ARR (which needs a second column) away from S = 1
            values[b] = matrix[0, 0] if np.isfinite(matrix[0, 0]) else np.nan
            stats[b, 0] = 0 if use else 1
            stats[b, 1] = 0
            stats[b, 2] = 0
            if slot >= 0:
                assign[slot, 0] = 0
                duals[slot, 0] = -matrix[0, 0]
            continue
        if use:
            for j in range(n):
                x0[j] = assign[slot, j]
                v0[j] = duals[slot, j]
        if not _solve_one(matrix, use, x0, v0, x, y, v, u, free, d, cols, pred, stats[b]):
            values[b] = np.nan
            continue
        total = 0.0
        for i in range(n):
            total += matrix[i, x[i]]
        values[b] = total
        if slot >= 0:
            for j in range(n):
                assign[slot, j] = x[j]
                duals[slot, j] = v[j]


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
