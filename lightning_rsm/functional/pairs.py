"""Every pair's optimal assignment value, solved in blocks: the work behind ``semantic_rsm``.

One batched matmul per row segment forms the ``(B, S, S)`` score matrices of a block of pairs,
a matcher of the registry solves them, and blocks run on a thread pool (the solvers release the
GIL). With ``y=None`` only pairs ``i < j`` are solved. With a process group the blocks are split
across its ranks and the result summed; a failure on one rank raises on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from lightning_rsm.functional.distributed import (
    raise_if_any_rank_failed,
    sum_across_ranks,
    world_of,
)
from lightning_rsm.functional.matching import (
    AssignmentCache,
    auction_assignment,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.options import (
    TORCH_MATCHERS,
)

# (value, upper) of each pair, float64 (B,): all an RSM needs of a solver's Assignment
Bounds = tuple[Tensor, Tensor]


def _match_auction(scores: Tensor, norms_x: Tensor, norms_y: Tensor, tol: float) -> Bounds:
    """Auction with ``tol`` on the cosine scale: the raw tolerance is ``tol * |X_i| * |Y_j|``."""
    scale = norms_x.double().norm(dim=1) * norms_y.double().norm(dim=1)
    result = auction_assignment(scores, tol=(tol * scale).clamp_min(1e-300))
    return result.value, result.upper


def _match_exact(scores: Tensor, options: dict) -> Bounds:
    """Exact values; warm-started from (and stored into) ``options["warm_start"]`` if given."""
    cache: AssignmentCache | None = options.get("warm_start")
    if cache is None:
        result = match_exact(scores)
        return result.value, result.upper
    # float32 scores go to the solver as they are (it computes in float64): no float64 copy
    values = torch.from_numpy(cache.solve(scores.cpu().numpy(), options["block"]))
    values = values.to(scores.device)
    return values, values.clone()


# name -> solver(scores (B, S, S), norms_x (B, S), norms_y (B, S), options) -> (value, upper);
# options hold the keyword options of semantic_rsm and the block's segments ("block")
_MATCHERS: dict[str, Callable[[Tensor, Tensor, Tensor, dict], Bounds]] = {
    "auction": lambda scores, nx, ny, opts: _match_auction(scores, nx, ny, opts["tol"]),
    "exact": lambda scores, nx, ny, opts: _match_exact(scores, opts),
    "greedy": lambda scores, nx, ny, opts: match_greedy(scores)[:2],
    "windowed": lambda scores, nx, ny, opts: match_windowed(scores, nx, ny, opts["window"])[:2],
}

# Score matrices held per block on CPU; bounds memory, independent of N. The auction's cost per
# bidding round is mostly fixed, so it gets larger blocks; on CUDA blocks fill free memory.
_BLOCK_ENTRIES = {"auction": 2**23}
_DEFAULT_BLOCK_ENTRIES = 2**21
# Bytes of device memory the auction uses per score entry (float64 copies and scratch).
_AUCTION_BYTES_PER_ENTRY = 40

Segment = tuple[int, int, int]  # (row i, first column j0, end column j1)


class RSMCancelled(Exception):
    """Raised by :func:`~lightning_rsm.functional.semantic_rsm` when its ``should_stop`` returned
    True: the computation stopped between two blocks of pairs and returned nothing.

    Example:
        >>> import torch
        >>> from lightning_rsm.functional import semantic_rsm
        >>> semantic_rsm(torch.rand(4, 8, 2, 2), should_stop=lambda: True)
        Traceback (most recent call last):
        ...
        lightning_rsm.functional.pairs.RSMCancelled: semantic_rsm stopped: `should_stop` returned \
True with 0 of 1 blocks solved.
    """


def available_cpus() -> int:
    """Cores this process may run on: ``os.process_cpu_count()`` (Python 3.13+), else the
    affinity mask where the platform has one (Linux), else ``os.cpu_count()`` (at least 1).

    Example:
        >>> available_cpus() >= 1
        True
    """
    if hasattr(os, "process_cpu_count"):
        count = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    return count or 1


def _default_block_pairs(size: int, matcher: str, device: torch.device) -> int:
    """Pairs per block: from free memory for torch matchers on CUDA, else a fixed budget."""
    if device.type == "cuda" and matcher in TORCH_MATCHERS:
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2 // (_AUCTION_BYTES_PER_ENTRY * size * size))
    entries = _BLOCK_ENTRIES.get(matcher, _DEFAULT_BLOCK_ENTRIES)
    # scipy's solves dominate and need no big matmuls: small blocks balance the threads' load
    most = 8192 if matcher in TORCH_MATCHERS else 256
    return max(1, min(most, entries // (size * size)))


def _segments(n: int, m: int, symmetric: bool, block_pairs: int) -> list[list[Segment]]:
    """Split the pairs to solve into blocks of at most ``block_pairs`` pairs.

    Pairs run row by row (``j > i`` only when symmetric); a block is a list of row segments,
    so every segment's columns are a contiguous slice and need no gather. The split depends
    only on the shapes, so every process forms the same blocks.
    """
    blocks: list[list[Segment]] = []
    current: list[Segment] = []
    room = block_pairs
    for i in range(n):
        j = i + 1 if symmetric else 0
        while j < m:
            stop = min(m, j + room)
            current.append((i, j, stop))
            room -= stop - j
            j = stop
            if room == 0:
                blocks.append(current)
                current, room = [], block_pairs
    if current:
        blocks.append(current)
    return blocks


def _solve_block(
    xs: Tensor,
    ys: Tensor,
    norms_x: Tensor,
    norms_y: Tensor,
    block: list[Segment],
    solve: Callable[[Tensor, Tensor, Tensor, dict], Bounds],
    options: dict,
) -> tuple[list[Segment], Tensor, Tensor]:
    """Form the block's score matrices with one matmul per row segment and solve them."""
    with torch.no_grad():
        # each segment's products go straight into the block's tensor: no copy by torch.cat
        scores = xs.new_empty(sum(j1 - j0 for _, j0, j1 in block), xs.shape[1], ys.shape[1])
        start = 0
        for i, j0, j1 in block:
            torch.matmul(xs[i], ys[j0:j1].transpose(1, 2), out=scores[start : start + j1 - j0])
            start += j1 - j0
        nx = torch.cat([norms_x[i].expand(j1 - j0, -1) for i, j0, j1 in block])
        ny = torch.cat([norms_y[j0:j1] for _, j0, j1 in block])
        value, upper = solve(scores, nx, ny, {**options, "block": block})
    return block, value, upper


@contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads of the calling thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_blocks(
    blocks: list[list[Segment]],
    work: Callable[[list[Segment]], tuple[list[Segment], Tensor, Tensor]],
    num_workers: int,
    progress: bool | str,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[list[Segment], Tensor, Tensor]]:
    """Yield solved blocks, at most ``2 * num_workers`` in flight.

    ``should_stop`` is asked before each block starts and after each one ends (at least every
    half second with threads); once it returns True, :class:`RSMCancelled` is raised. On any
    exception (Ctrl-C included) blocks not yet started are dropped and the call returns once the
    running ones end: no thread is left behind.
    """
    total = sum(j1 - j0 for block in blocks for _, j0, j1 in block)
    label = progress if isinstance(progress, str) else "semantic RSM"
    bar = tqdm(total=total, disable=not progress, unit="pair", desc=label, leave=False)
    solved = 0

    def check() -> None:
        if should_stop is not None and should_stop():
            raise RSMCancelled(
                "semantic_rsm stopped: `should_stop` returned True with "
                f"{solved} of {len(blocks)} blocks solved."
            )

    # The small per-block matmuls run fastest on one thread each; the workers use the cores.
    with bar, _intra_op_threads(1):
        if num_workers == 1:
            for block in blocks:
                check()
                result = work(block)
                solved += 1
                bar.update(sum(j1 - j0 for _, j0, j1 in block))
                yield result
            return
        # OpenMP's thread count is per thread: each worker sets its own to 1.
        pool = ThreadPoolExecutor(
            max_workers=num_workers,
            thread_name_prefix="lightning_rsm",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        pending: set[Future] = set()
        todo = iter(blocks)
        try:
            while True:
                check()
                for block in todo:
                    pending.add(pool.submit(work, block))
                    if len(pending) >= 2 * num_workers:
                        break
                if not pending:
                    break
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    solved += 1
                    bar.update(sum(j1 - j0 for _, j0, j1 in result[0]))
                    yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _assignment_bounds(
    xs: Tensor,
    ys: Tensor,
    symmetric: bool,
    matcher: str,
    options: dict,
    block_size: int | None,
    num_workers: int | None,
    progress: bool | str,
    distributed: bool | dist.ProcessGroup,
    sq_x: Tensor,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds on v_ij for every pair, float64 tensors of shape ``(N, M)``.

    ``sq_x`` are the squared norms of ``xs`` (the diagonal when ``symmetric``).
    """
    n, m, size = xs.shape[0], ys.shape[0], xs.shape[1]
    norms_x = xs.norm(dim=2)
    norms_y = norms_x if symmetric else ys.norm(dim=2)
    block_pairs = block_size or _default_block_pairs(size, matcher, xs.device)
    blocks = _segments(n, m, symmetric, block_pairs)
    rank, world = world_of(distributed)
    blocks = blocks[rank::world]
    if num_workers is None:
        on_device = xs.is_cuda and matcher in TORCH_MATCHERS
        num_workers = 1 if on_device else available_cpus()
    solve = _MATCHERS[matcher]

    def work(block: list[Segment]) -> tuple[list[Segment], Tensor, Tensor]:
        return _solve_block(xs, ys, norms_x, norms_y, block, solve, options)

    lower = torch.zeros(n, m, dtype=torch.float64, device=xs.device)
    upper = torch.zeros_like(lower)
    error = None
    try:
        for block, value, bound in _run_blocks(
            blocks, work, num_workers, progress if rank == 0 else False, should_stop
        ):
            start = 0
            for i, j0, j1 in block:
                lower[i, j0:j1] = value[start : start + j1 - j0]
                upper[i, j0:j1] = bound[start : start + j1 - j0]
                start += j1 - j0
    except Exception as caught:
        if world == 1:
            raise
        error = caught
    if world > 1:
        group = None if isinstance(distributed, bool) else distributed
        raise_if_any_rank_failed(error, group)
        sum_across_ranks(lower, upper, group=group)
    if symmetric:
        diagonal = torch.diag(sq_x)
        lower = lower + lower.T + diagonal
        upper = upper + upper.T + diagonal
    return lower, upper
