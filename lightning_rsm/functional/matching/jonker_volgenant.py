"""The compiled Jonker-Volgenant kernels behind ``lap.linear_assignment_batch``.

Compiled with numba (``cache=True, nogil=True``) when it imports, else plain Python (used only
through the scipy fallback of :mod:`lightning_rsm.functional.matching.lap`). Each kernel takes one
``(S, S)`` matrix ``scores`` and minimises the cost ``c = -scores`` with row duals ``u`` and
column duals ``v``; the module docstring of :mod:`lightning_rsm.functional.matching.lap`
describes the cold and the warm solve.

The algorithm is R. Jonker and A. Volgenant, "A shortest augmenting path algorithm for dense and
sparse linear assignment problems", Computing 38, 325-340 (1987),
https://doi.org/10.1007/BF02278710. The column reduction with reduction transfer
(:func:`_cold_start`), the augmenting row reduction (:func:`_augmenting_row_reduction`) and the
shortest path search (:func:`_shortest_path`) follow the structure of ``lapjv.cpp`` of
gatagat/lap (https://github.com/gatagat/lap), translated to numba, whose notice follows. The
warm start and the certificate are our own.

    Copyright (c) 2012-2017, Tomas Kazmar
    All rights reserved.

    Redistribution and use in source and binary forms, with or without modification, are
    permitted provided that the following conditions are met:

    Redistributions of source code must retain the above copyright notice, this list of
    conditions and the following disclaimer.
    Redistributions in binary form must reproduce the above copyright notice, this list of
    conditions and the following disclaimer in the documentation and/or other materials
    provided with the distribution.

    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
    OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF
    MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE
    COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
    EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
    SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION)
    HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR
    TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS
    SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""

from __future__ import annotations

import numpy as np

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised by forcing `backend="scipy"` in the tests
    numba = None
    HAVE_NUMBA = False

# Sentinels. A row or column without a partner in x / y:
UNASSIGNED = -1
# Returned instead of a count of free rows: the scores hold NaN/Inf ...
NOT_FINITE = -1
# ... or the warm start is unusable (not a permutation, duals not finite or far off, old
# solution far off).
SOLVE_COLD = -2

# Warm duals whose spread exceeds this multiple of S * |score| (the largest on the old edges)
# are ignored: JV's duals stay within about S times the score range, far larger ones would drown
# the costs in rounding.
_DUAL_SPREAD = 4.0
# A warm start is dropped for a cold one when the old edges' mean reduced cost exceeds this share
# of |score| (duals of an unrelated problem: repairing and re-assigning nearly every row costs
# more than JV's own start). Measured: 0.001-0.05 between epochs of a trained CNN, 0.6 between
# independent random ReLU features.
_WARM_MAX_GAP = 0.2
# ... judged on the first max(_WARM_FIRST_ROWS, S // 8) rows already, so that a hopeless warm
# start costs a small part of one pass over the scores before the cold solve.
_WARM_FIRST_ROWS = 4
# A warm edge whose reduced cost is within this many ulps of |score| + the duals' spread counts as
# tight.
_TIGHT_ULPS = 16.0
# A warm solve is accepted when every assigned edge is tight within this many ulps of
# (1 + _DUAL_SPREAD * S) * max |score| (see _certified); otherwise the matrix is solved cold.
_CERTIFY_ULPS = 32.0
# Passes of augmenting row reduction (JV's choice) before the shortest paths.
_ARR_PASSES = 2
# A pass of ARR stops lowering duals after this many steps per free row (JV: up to S per free
# row, the cap of our cold solves before 2026-12). On near ties (a ViT's patch tokens late in
# AdamW training) ARR cycles through rows swapping columns; capped, the rows left take shortest
# paths. Measured per pair, one thread, S = 64 (benchmarks/README.md): cold solves of the ViT's
# tokens 2.1-2.4x and of random ReLU features 1.9x faster than with JV's cap, the demo CNN's
# as fast; warm solves as fast as with 2 or 4 steps.
_ARR_STEPS = 8


def _njit(function):
    """``numba.njit(cache=True, nogil=True)``, or the plain function without numba.

    Compiles lazily, on the first call with new argument types (about 2 s each), and caches the
    machine code on disk: next to this file, else (read-only site-packages) numba's per-user
    cache dir, or ``NUMBA_CACHE_DIR``. Where no cache dir is writable it compiles per process.
    ``nogil`` lets the solver threads of :func:`~lightning_rsm.functional.semantic_rsm` run
    in parallel.
    """
    if not HAVE_NUMBA:
        return function
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # pragma: no cover - "cannot cache function": no writable cache dir
        return numba.njit(nogil=True)(function)


@_njit
def _unassign(x, y):
    """Mark every row and column :data:`UNASSIGNED`."""
    for j in range(x.shape[0]):
        x[j] = UNASSIGNED
        y[j] = UNASSIGNED


@_njit
def _augmenting_row_reduction(scores, free, n_free, x, y, v, budget, row):
    """One pass of JV's augmenting row reduction over ``free[:n_free]``; returns rows left free.

    Keeps the invariant that every assigned row's reduced cost is its row minimum (``v`` only
    decreases, and the owner of a column whose dual changes is evicted). After ``budget`` steps
    (JV: ``S * n_free``; we pass :data:`_ARR_STEPS` ``* n_free``) every row still to do is placed
    once without lowering a dual, and the evicted rows are left for the shortest paths. ``row``
    is scratch.
    """
    n = scores.shape[0]
    current = 0
    new_free = 0
    count = 0
    while current < n_free:
        count += 1
        i = free[current]
        current += 1
        _reduced_row(scores, i, v, row)
        j1 = 0
        best = row[0]
        j2 = UNASSIGNED
        second = np.inf
        for j in range(1, n):
            c = row[j]
            if c < second:
                if c >= best:
                    second = c
                    j2 = j
                else:
                    second = best
                    best = c
                    j2 = j1
                    j1 = j
        i0 = y[j1]
        lowered = v[j1] - (second - best)
        lowers = lowered < v[j1]
        if count < current * n and count < budget:
            if lowers:
                v[j1] = lowered
            elif i0 >= 0 and j2 >= 0:
                j1 = j2
                i0 = y[j2]
            if i0 >= 0:
                if lowers:
                    current -= 1
                    free[current] = i0
                else:
                    free[new_free] = i0
                    new_free += 1
        elif i0 >= 0:
            free[new_free] = i0
            new_free += 1
        if i0 >= 0:
            x[i0] = UNASSIGNED
        x[i] = j1
        y[j1] = i
    return new_free


@_njit
def _shortest_path(scores, start, x, y, v, d, cols, pred, row):
    """Dijkstra from free row ``start`` on the reduced costs; updates ``v``, returns end column.

    ``d``, ``cols``, ``pred`` and ``row`` are scratch; ``pred`` holds the path on return.
    """
    n = scores.shape[0]
    for j in range(n):
        cols[j] = j
        pred[j] = start
        d[j] = -scores[start, j] - v[j]
    lo = 0
    hi = 0
    ready = 0
    end = UNASSIGNED
    while end < 0:
        if lo == hi:
            # move every column at the smallest distance to cols[lo:hi]
            ready = lo
            hi = lo + 1
            mind = d[cols[lo]]
            for k in range(hi, n):
                j = cols[k]
                if d[j] <= mind:
                    if d[j] < mind:
                        hi = lo
                        mind = d[j]
                    cols[k] = cols[hi]
                    cols[hi] = j
                    hi += 1
            for k in range(lo, hi):
                if y[cols[k]] < 0:
                    end = cols[k]
                    break
        if end >= 0:
            break
        # scan the rows assigned to the columns at the smallest distance
        while lo != hi and end < 0:
            j = cols[lo]
            lo += 1
            i = y[j]
            mind = d[j]
            _reduced_row(scores, i, v, row)
            h = row[j] - mind
            for k in range(hi, n):
                j = cols[k]
                reduced = row[j] - h
                if reduced < d[j]:
                    d[j] = reduced
                    pred[j] = i
                    if reduced == mind:
                        if y[j] < 0:
                            end = j
                            break
                        cols[k] = cols[hi]
                        cols[hi] = j
                        hi += 1
    mind = d[end]
    for k in range(ready):
        j = cols[k]
        v[j] += d[j] - mind
    return end


@_njit
def _reduced_row(scores, i, v, row):
    """Write ``row[j] = -scores[i, j] - v[j]`` (row i's costs less the column duals); returns how
    many are NaN or infinite.

    One loop that only writes and one that only reduces (:func:`_smallest`) compile to vector
    code; a row minimum taken in the same loop does not (about 2.5x slower, measured).
    """
    bad = 0
    for j in range(scores.shape[1]):
        t = -scores[i, j] - v[j]
        row[j] = t
        bad += (t - t) != 0.0  # NaN for NaN and +-inf
    return bad


@_njit
def _smallest(row):
    """The smallest entry of ``row`` (finite entries)."""
    low = np.inf
    for j in range(row.shape[0]):
        if row[j] < low:
            low = row[j]
    return low


@_njit
def _narrow(room, row, row_min):
    """``room[k] = min(room[k], row[k] - row_min)``: a row kept at its minimum ``row_min``
    limits how far each column's dual may rise (one loop the compiler vectorises)."""
    for k in range(row.shape[0]):
        left = row[k] - row_min
        room[k] = left if left < room[k] else room[k]


@_njit
def _largest(scores):
    """``max |scores|`` (finite scores)."""
    big = 0.0
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            a = abs(scores[i, j])
            if a > big:
                big = a
    return big


@_njit
def _warm_start(scores, x0, v0, x, y, v, u, free, row):
    """Keep the rows of assignment ``x0`` that are tight under duals ``v0``; returns free rows.

    ``x`` and ``y`` must be all :data:`UNASSIGNED`; ``row`` is scratch. Returns
    :data:`NOT_FINITE` if ``scores`` hold NaN/Inf, :data:`SOLVE_COLD` if ``x0`` is not a
    permutation, ``v0`` is unusable or the old solution is far off (then x, y, v are garbage).
    """
    n = scores.shape[0]
    vlo = np.inf
    vhi = -np.inf
    for j in range(n):
        if not abs(v0[j]) < np.inf:  # NaN or infinite
            return SOLVE_COLD
        vlo = min(vlo, v0[j])
        vhi = max(vhi, v0[j])
    # only differences of duals matter (u absorbs a common shift): shifted to a largest dual of
    # 0, their size is their spread, and a large common component of old duals adds no rounding
    for j in range(n):
        v[j] = v0[j] - vhi
    vlo -= vhi
    # the scale of the scores from the old edges, before the pass over all entries; y marks
    # the columns seen
    scale = 0.0
    for i in range(n):
        j = x0[i]
        if j < 0 or j >= n or y[j] != UNASSIGNED:
            return SOLVE_COLD
        y[j] = i
        scale = max(scale, abs(scores[i, j]))
    _unassign(x, y)
    # far-off duals would drown the costs in rounding
    if -vlo > _DUAL_SPREAD * n * scale:
        return SOLVE_COLD
    # an edge off tight by rounding only (the duals come from a solve of the same problem, or
    # one that changed less than this) is kept as tight: the value is then off by at most
    # n * tol, like the rounding of any floating-point solve
    tol = _TIGHT_ULPS * np.finfo(np.float64).eps * (scale - vlo)
    # keep every row whose old edge is still tight; an old solution far off (duals of an
    # unrelated problem) is dropped for a cold solve as soon as the first rows show it
    undecided = 0
    gaps = 0.0
    first = max(_WARM_FIRST_ROWS, n // 8)
    # room[k]: how far column k's dual can rise before a kept row's reduced cost there would
    # go negative
    room = np.empty(n, dtype=np.float64)
    for k in range(n):
        room[k] = np.inf
    for i in range(n):
        if _reduced_row(scores, i, v, row):
            return NOT_FINITE
        row_min = _smallest(row)
        u[i] = row_min
        j = x0[i]
        gap = row[j] - row_min
        gaps += gap
        if gap <= tol:
            x[i] = j
            y[j] = i
            _narrow(room, row, row_min)
        else:
            free[undecided] = i
            undecided += 1
        if i + 1 == first and gaps > _WARM_MAX_GAP * first * scale:
            return SOLVE_COLD
    if gaps > _WARM_MAX_GAP * n * scale:
        return SOLVE_COLD
    # then try to make the other old edges tight by raising v[j] by the row's gap, where no kept
    # row's reduced cost in column j goes negative: kept rows stay at their row minimum (their
    # edges are untouched), and free rows need no dual (ARR and the paths take row minima)
    n_free = 0
    for f in range(undecided):
        i = free[f]
        j = x0[i]
        # j is i's alone (x0 is a permutation): its dual is still the one room[j] was taken for
        _reduced_row(scores, i, v, row)
        row_min = _smallest(row)
        gap = row[j] - row_min
        if gap <= tol or gap <= room[j]:
            if gap > tol:
                v[j] += gap
            u[i] = row_min
            x[i] = j
            y[j] = i
            _narrow(room, row, row_min)
            continue
        # not tight enough, but raise v[j] as far as the kept rows allow (dual ascent): the
        # free column comes closer to the free rows, their shortest paths end sooner
        v[j] += room[j]
        free[n_free] = i
        n_free += 1
    return n_free


@_njit
def _certified(scores, x, y, v, low):
    """Whether assignment ``x`` is optimal for ``scores`` under column duals ``v``, up to rounding.

    The certificate depends only on the current scores: with row duals ``u_i`` that make every
    assigned edge tight (``u_i = c_ix_i - v_x_i``), every reduced cost ``c_ij - u_i - v_j`` must
    be at least ``-tol``, ``tol = _CERTIFY_ULPS * eps * (1 + _DUAL_SPREAD * n) * max |score|``,
    and the duals' spread at most ``_DUAL_SPREAD * n * max |score|`` (so rounding of the reduced
    costs stays below ``tol``). Then the value is within ``n * tol`` of the optimum.

    One pass over the scores, row by row, keeps ``low[j] = min_i (c_ij - u_i)`` (scratch
    ``low``): a loop without a reduction, which the compiler vectorises. ``max |score|`` is
    bounded from below by the assigned entries; the full maximum is taken only where that
    tolerance does not settle the checks.
    """
    n = scores.shape[0]
    largest = 0.0
    for i in range(n):
        j = x[i]
        if j < 0 or j >= n or y[j] != i:
            return False
        largest = max(largest, abs(scores[i, j]))
    for j in range(n):
        low[j] = np.inf
    for i in range(n):
        j = x[i]
        edge = -scores[i, j] - v[j]
        for k in range(n):
            t = -scores[i, k] - edge
            low[k] = t if t < low[k] else low[k]
    vlo = np.inf
    vhi = -np.inf
    worst = -np.inf
    for j in range(n):
        vlo = min(vlo, v[j])
        vhi = max(vhi, v[j])
        worst = max(worst, v[j] - low[j])
    tol = _CERTIFY_ULPS * np.finfo(np.float64).eps * (1.0 + _DUAL_SPREAD * n)
    if vhi - vlo > _DUAL_SPREAD * n * largest or worst > tol * largest:
        largest = _largest(scores)
    return vhi - vlo <= _DUAL_SPREAD * n * largest and worst <= tol * largest


@_njit
def _cold_start(scores, x, y, v, free):
    """JV's column reduction and reduction transfer; returns free rows or :data:`NOT_FINITE`.

    ``x`` must be all :data:`UNASSIGNED`.
    """
    n = scores.shape[0]
    for j in range(n):
        v[j] = np.inf
    for i in range(n):
        for j in range(n):
            c = -scores[i, j]
            if not abs(c) < np.inf:  # NaN or infinite
                return NOT_FINITE
            if c < v[j]:
                v[j] = c
                y[j] = i
    # each column goes to its cheapest row, the last column first
    unique = np.ones(n, dtype=np.bool_)
    for j in range(n - 1, -1, -1):
        i = y[j]
        if x[i] < 0:
            x[i] = j
        else:
            unique[i] = False
            y[j] = UNASSIGNED
    # reduction transfer from rows that got exactly one column
    n_free = 0
    for i in range(n):
        if x[i] < 0:
            free[n_free] = i
            n_free += 1
        elif unique[i]:
            j = x[i]
            low = np.inf
            for k in range(n):
                if k != j:
                    c = -scores[i, k] - v[k]
                    if c < low:
                        low = c
            v[j] -= low
    return n_free


# The batch driver: compiled in this module with the kernels it calls, so that a change to any
# of them invalidates numba's on-disk cache of all (the cache tracks only the defining file).
@_njit
def _solve_from(scores, warm, x0, v0, x, y, v, u, free, d, cols, pred):
    """Solve one ``(S, S)`` matrix of ``scores`` (the costs are their negatives) into x, y, v,
    warm from ``x0, v0`` where ``warm`` and the warm start is usable, else cold.

    Returns ``(rows not kept from the warm start (S when solved cold), rows that needed a
    shortest path, whether it was solved warm)``; the counts are -1 if ``scores`` hold NaN/Inf.
    ``u``, ``free``, ``d``, ``cols`` and ``pred`` are scratch (``u`` holds the row duals only
    during the warm start, and is the shortest paths' scratch row after it).
    """
    n = scores.shape[0]
    n_free = SOLVE_COLD
    if warm:
        _unassign(x, y)
        n_free = _warm_start(scores, x0, v0, x, y, v, u, free, d)
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
        budget = _ARR_STEPS * n_free
        n_free = _augmenting_row_reduction(scores, free, n_free, x, y, v, budget, d)
    for f in range(n_free):
        start = free[f]
        j = _shortest_path(scores, start, x, y, v, d, cols, pred, u)
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
    if solved_warm and not_kept >= 0 and not _certified(scores, x, y, v, d):
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
