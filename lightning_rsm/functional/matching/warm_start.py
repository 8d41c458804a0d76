"""Warm-start state for exact semantic RSMs evaluated again and again (e.g. once per epoch).

:class:`AssignmentCache` keeps, for each pair ``(i, j)`` of an RSM, the last optimal assignment
and column duals, and :func:`~lightning_rsm.functional.semantic_rsm` starts the next solve of
that pair from them (see :mod:`lightning_rsm.functional.matching.lap`). The result is the exact
optimum whatever the cache holds; the cache only makes it cheaper while the features drift slowly.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from lightning_rsm.functional.matching import lap

_DUAL_DTYPE = np.float64


def _assignment_dtype(size: int) -> np.dtype:
    """Smallest integer dtype that holds a column index below ``size``."""
    for dtype in (np.uint8, np.int16):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int32)


class AssignmentCache:
    """Previous LAP solutions of every pair of an RSM, to warm-start the next evaluation.

    Pass the same cache to every call of
    ``semantic_rsm(x, matcher="exact", warm_start=cache)`` on one probe (one cache per monitored
    layer): the first call solves cold and fills it, later calls start each pair from its last
    solution and give the same RSM (exact) at a fraction of the solve time while the features
    drift slowly. Other matchers ignore the cache.

    Memory: per cached pair ``bytes_per_pair(S) = S * (a + 8) + 1`` bytes, with ``a = 1`` byte
    per assignment index for S <= 256 (``2`` up to 32768), float64 column duals and a flag, e.g.
    577 B at S = 64 (145 B at S = 16). A probe of 1000 samples has 499,500 pairs: 288 MB at
    S = 64, so the default cap of 256 MiB keeps 465,000 of them (93 %). Pairs beyond
    ``max_bytes`` (in pair order: row by row, ``j > i``) are solved cold every time. The arrays
    are allocated on the first call (the OS commits pages as they are written). The duals are
    float64: rounded to float32 (1e-7), they loosen some tight edges, and a layer that did not
    change (e.g. frozen) re-assigns 4-9 of 64 rows per pair (measured on the demo CNN) instead
    of none, at a cost of one pass over its scores.

    The cache is bound to the shapes of the call: it is emptied automatically (and the call
    solves cold) when N, M, S or symmetry (``y`` given or not) change. It does not notice a
    different probe of the same shape: results stay exact, the warm start just gains nothing.
    It holds nothing a checkpoint needs: after a restart the first evaluation is cold.

    Thread safety: one call at a time per cache; within a call the solver threads write
    disjoint pairs.

    Args:
        max_bytes: cap on the memory of the kept solutions; None for no cap. Default 256 MiB.

    Raises:
        ValueError: If ``max_bytes`` is not a non-negative int or None.

    Example:
        >>> import torch
        >>> from lightning_rsm.functional import semantic_rsm
        >>> x = torch.rand(6, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> cache = AssignmentCache()
        >>> cold = semantic_rsm(x, warm_start=cache)            # first call: cold, fills cache
        >>> warm = semantic_rsm(x + 1e-3, warm_start=cache)     # warm-started, still exact
        >>> bool((warm - semantic_rsm(x + 1e-3)).abs().max() < 1e-6), cache.stats["warm_pairs"]
        (True, 15)
    """

    def __init__(self, max_bytes: int | None = 2**28) -> None:
        if max_bytes is not None and not (
            isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes >= 0
        ):
            raise ValueError(
                f"Expected `max_bytes` to be a non-negative int or None, but got {max_bytes!r}."
            )
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.clear()

    def __getstate__(self) -> dict:
        """Pickles (e.g. a callback sent to spawned DDP processes) carry the cap, not the lock
        or the kept solutions: the copy starts cold."""
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    @staticmethod
    def bytes_per_pair(size: int) -> int:
        """Bytes kept per pair at S = ``size`` positions (assignment, duals, a valid flag)."""
        return size * (_assignment_dtype(size).itemsize + np.dtype(_DUAL_DTYPE).itemsize) + 1

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept solutions."""
        return self._assign.nbytes + self._duals.nbytes + self._valid.nbytes

    def clear(self) -> None:
        """Forget every solution; the next call solves cold."""
        self._key: tuple[int, int, int, bool] | None = None
        self._assign = np.empty((0, 0), dtype=np.uint8)
        self._duals = np.empty((0, 0), dtype=_DUAL_DTYPE)
        self._valid = np.empty(0, dtype=np.bool_)
        self.stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict[str, int]:
        return dict(
            pairs=0,
            warm_pairs=0,
            warm_pairs_solved_cold=0,
            rows=0,
            rows_reassigned=0,
            rows_shortest_path=0,
        )

    def bind(self, n: int, m: int, size: int, symmetric: bool) -> None:
        """Prepare for one RSM of N x M pairs at S = ``size`` (``symmetric``: pairs ``i < j`` of
        one set); empties the cache if that changed, and resets :attr:`stats`.

        :func:`~lightning_rsm.functional.semantic_rsm` calls it once per call, then
        :meth:`solve` per block of pairs.
        """
        key = (n, m, size, symmetric)
        if key != self._key:
            pairs = n * (n - 1) // 2 if symmetric else n * m
            if self.max_bytes is not None:
                pairs = min(pairs, self.max_bytes // self.bytes_per_pair(size))
            self._key = key
            self._assign = np.empty((pairs, size), dtype=_assignment_dtype(size))
            self._duals = np.empty((pairs, size), dtype=_DUAL_DTYPE)
            self._valid = np.zeros(pairs, dtype=np.bool_)
        self.stats = self._empty_stats()

    def _pair_ids(self, block: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Ids of the pairs of row segments ``(i, j0, j1)``: row by row, ``j > i`` if symmetric."""
        n, m, _, symmetric = self._key
        parts = []
        for i, j0, j1 in block:
            first = i * (2 * n - i - 1) // 2 - i - 1 if symmetric else i * m
            parts.append(np.arange(first + j0, first + j1, dtype=np.int64))
        return np.concatenate(parts)

    def solve(self, scores: np.ndarray, block: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Optimal values of one block of pairs, warm where a solution is kept; keeps the new ones.

        Args:
            scores: C-contiguous float32 or float64 array ``(B, S, S)``, the score matrices of
                the pairs of ``block`` in order.
            block: row segments ``(i, j0, j1)``: the pairs ``(i, j)`` for ``j0 <= j < j1``.

        Returns:
            float64 array ``(B,)``.

        Example:
            >>> cache = AssignmentCache()
            >>> cache.bind(2, 2, 2, symmetric=True)   # one pair: (0, 1)
            >>> cache.solve(np.array([[[3.0, 1.0], [2.0, 0.0]]]), [(0, 1, 2)])
            array([3.])
            >>> cache.solve(np.array([[[3.0, 1.5], [2.0, 0.0]]]), [(0, 1, 2)])
            array([3.5])
            >>> cache.stats["warm_pairs"]
            1
        """
        slots = self._pair_ids(block)
        slots[slots >= len(self._valid)] = -1
        kept = slots >= 0
        warm = np.zeros(len(slots), dtype=np.bool_)
        if lap.HAVE_NUMBA:  # scipy keeps no duals: solves cold, nothing to start from
            warm[kept] = self._valid[slots[kept]]
        values, rows = lap.solve_into(scores, slots, warm, self._assign, self._duals)
        self._valid[slots[kept]] = True
        with self._lock:
            stats = self.stats
            stats["pairs"] += len(slots)
            stats["warm_pairs"] += int(warm.sum())
            stats["warm_pairs_solved_cold"] += int(rows[:, 2].sum())
            stats["rows"] += scores.shape[0] * scores.shape[1]
            stats["rows_reassigned"] += int(rows[:, 0].sum())
            stats["rows_shortest_path"] += int(rows[:, 1].sum())
        return values
