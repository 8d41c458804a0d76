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
# ... or the warm start is unusable (duals not finite or far off, old solution far off).
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
# A warm edge whose reduced cost is within this many ulps of |score| + the duals' spread counts as
# tight.
_TIGHT_ULPS = 16.0
# A warm solve is accepted when every assigned edge is tight within this many ulps of
# (1 + _DUAL_SPREAD * S) * max |score| (see _certified); otherwise the matrix is solved cold.
_CERTIFY_ULPS = 32.0


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
def _augmenting_row_reduction(scores, free, n_free, x, y, v, budget):
    """One pass of JV's augmenting row reduction over ``free[:n_free]``; returns rows left free.

    Keeps the invariant that every assigned row's reduced cost is its row minimum (``v`` only
    decreases, and the owner of a column whose dual changes is evicted). After ``budget`` steps
    (JV: ``S * n_free``, never binding) every row still to do is placed once without lowering a
    dual, and the evicted rows are left for the shortest paths.
    """
    n = scores.shape[0]
    current = 0
    new_free = 0
    count = 0
    while current < n_free:
        count += 1
        i = free[current]
        current += 1
        j1 = 0
        best = -scores[i, 0] - v[0]
        j2 = UNASSIGNED
        second = np.inf
        for j in range(1, n):
            c = -scores[i, j] - v[j]
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
def _shortest_path(scores, start, x, y, v, d, cols, pred):
    """Dijkstra from free row ``start`` on the reduced costs; updates ``v``, returns end column."""
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
            h = -scores[i, j] - v[j] - mind
            for k in range(hi, n):
                j = cols[k]
                reduced = -scores[i, j] - v[j] - h
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
def _warm_start(scores, x0, v0, x, y, v, u, free):
    """Keep the rows of assignment ``x0`` that are tight under duals ``v0``; returns free rows.

    ``x`` and ``y`` must be all :data:`UNASSIGNED`. Returns :data:`NOT_FINITE` if ``scores``
    hold NaN/Inf, :data:`SOLVE_COLD` if ``v0`` is unusable or nearly no old edge is still tight
    (then x, y, v are garbage).
    """
    n = scores.shape[0]
    vlo = np.inf
    vhi = -np.inf
    check = 0.0
    for j in range(n):
        check += v0[j] - v0[j]  # NaN once any dual is NaN or infinite
        vlo = min(vlo, v0[j])
        vhi = max(vhi, v0[j])
    if check != 0.0:
        return SOLVE_COLD
    # only differences of duals matter (u absorbs a common shift): shifted to a largest dual of
    # 0, their size is their spread, and a large common component of old duals adds no rounding
    for j in range(n):
        v[j] = v0[j] - vhi
    vlo -= vhi
    vhi = 0.0
    for i in range(n):
        row_min = np.inf
        for j in range(n):
            c = scores[i, j]
            check += c - c  # NaN once any entry is NaN or infinite
            t = -c - v[j]
            if t < row_min:
                row_min = t
        u[i] = row_min
    if check != 0.0:
        return NOT_FINITE
    # the scale of the scores, from the old edges (no pass over all entries): at most max |score|
    scale = 0.0
    for i in range(n):
        if 0 <= x0[i] < n:
            scale = max(scale, abs(scores[i, x0[i]]))
    # far-off duals would drown the costs in rounding
    if vhi - vlo > _DUAL_SPREAD * n * scale:
        return SOLVE_COLD
    # an edge off tight by rounding only (the duals come from a solve of the same problem, or
    # one that changed less than this) is kept as tight: the value is then off by at most
    # n * tol, like the rounding of any floating-point solve
    tol = _TIGHT_ULPS * np.finfo(np.float64).eps * (scale - vlo)
    # first keep every row whose old edge is still tight
    undecided = 0
    gaps = 0.0
    for i in range(n):
        j = x0[i]
        gap = -scores[i, j] - v[j] - u[i] if 0 <= j < n else scale
        gaps += gap
        if 0 <= j < n and y[j] < 0 and gap <= tol:
            x[i] = j
            y[j] = i
        else:
            free[undecided] = i
            undecided += 1
    if gaps > _WARM_MAX_GAP * n * scale:
        return (
            SOLVE_COLD  # the old solution is far off: duals of an unrelated problem, don't repair
        )
    # then try to make the other old edges tight by raising v[j] by the row's gap, where no kept
    # row's reduced cost in column j goes negative: kept rows stay at their row minimum (their
    # edges are untouched), and free rows need no dual (ARR and the paths take row minima)
    n_free = 0
    for f in range(undecided):
        i = free[f]
        j = x0[i]
        if 0 <= j < n and y[j] < 0:
            row_min = np.inf
            for k in range(n):
                row_min = min(row_min, -scores[i, k] - v[k])
            gap = -scores[i, j] - v[j] - row_min
            slack = np.inf
            if gap > tol:
                for k in range(n):
                    if x[k] >= 0:
                        slack = min(slack, -scores[k, j] - v[j] - u[k])
            if gap <= slack:
                if gap > tol:
                    v[j] += gap
                u[i] = row_min
                x[i] = j
                y[j] = i
                continue
            # not tight enough, but raise v[j] as far as the kept rows allow (dual ascent): the
            # free column comes closer to the free rows, their shortest paths end sooner
            v[j] += slack
        free[n_free] = i
        n_free += 1
    return n_free


@_njit
def _certified(scores, x, y, v):
    """Whether assignment ``x`` is optimal for ``scores`` under column duals ``v``, up to rounding.

    The certificate depends only on the current scores: with row duals ``u_i = min_j (c_ij -
    v_j)`` (feasible by construction) every assigned edge must be tight within ``tol =
    _CERTIFY_ULPS * eps * (1 + _DUAL_SPREAD * n) * max |score|``, and the duals' spread at most
    ``_DUAL_SPREAD * n * max |score|`` (so rounding of the reduced costs stays below ``tol``).
    Then the value is within ``n * tol`` of the optimum.
    """
    n = scores.shape[0]
    scale = 0.0
    vlo = np.inf
    vhi = -np.inf
    for j in range(n):
        vlo = min(vlo, v[j])
        vhi = max(vhi, v[j])
    worst = 0.0
    for i in range(n):
        j = x[i]
        if j < 0 or j >= n or y[j] != i:
            return False
        row_min = np.inf
        for k in range(n):
            scale = max(scale, abs(scores[i, k]))
            row_min = min(row_min, -scores[i, k] - (v[k] - vhi))
        worst = max(worst, -scores[i, j] - (v[j] - vhi) - row_min)
    if vhi - vlo > _DUAL_SPREAD * n * scale:
        return False
    return worst <= _CERTIFY_ULPS * np.finfo(np.float64).eps * (1.0 + _DUAL_SPREAD * n) * scale


@_njit
def _cold_start(scores, x, y, v, free):
    """JV's column reduction and reduction transfer; returns free rows or :data:`NOT_FINITE`.

    ``x`` must be all :data:`UNASSIGNED`.
    """
    n = scores.shape[0]
    check = 0.0
    for j in range(n):
        v[j] = np.inf
    for i in range(n):
        for j in range(n):
            c = -scores[i, j]
            check += c - c
            if c < v[j]:
                v[j] = c
                y[j] = i
    if check != 0.0:
        return NOT_FINITE
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
