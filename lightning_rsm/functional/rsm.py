"""Semantic (permutation-invariant) and spatio-semantic (flattened) RSMs.

For samples X_i, Y_j of S concept vectors each (``(S, C)`` matrices) the semantic RSM needs
one number per pair, the optimal assignment value

    v_ij = max over permutations P of sum_s <X_i[s], Y_j[P(s)]>,

because aligning Y_j by P keeps its norm: every kernel follows from v_ij and the two norms
(:func:`_apply_kernel`), and no permuted copy of any tensor is ever built. The spatio-semantic
baseline is the same with the identity permutation, ``trace(X_i @ Y_j.T)``.

Pairs are solved in blocks: one batched matmul forms the ``(B, S, S)`` score matrices of a block
of pairs, a matcher solves them, and blocks run on a thread pool (scipy's solver releases the
GIL). With ``y=None`` only pairs ``i < j`` are solved; the diagonal is exact by construction
(the identity permutation is optimal for a sample against itself). With ``distributed=True``
the blocks are split across the ranks of the process group and the result gathered.
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

from lightning_rsm.functional.auction import auction_assignment
from lightning_rsm.functional.matching import (
    MatchResult,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.options import (
    TORCH_MATCHERS,
    check_positive_int,
    check_rsm_options,
)
from lightning_rsm.functional.representations import _check_representations, _reshape_concepts
from lightning_rsm.functional.warm_start import AssignmentCache


def _match_auction(scores: Tensor, norms_x: Tensor, norms_y: Tensor, tol: float) -> MatchResult:
    """Auction with ``tol`` on the cosine scale: the raw tolerance is ``tol * |X_i| * |Y_j|``."""
    scale = norms_x.double().norm(dim=1) * norms_y.double().norm(dim=1)
    value, upper, _ = auction_assignment(scores, tol=(tol * scale).clamp_min(1e-300))
    return value, upper


def _match_exact(scores: Tensor, options: dict) -> MatchResult:
    """Exact values; warm-started from (and stored into) ``options["warm_start"]`` if given."""
    cache: AssignmentCache | None = options.get("warm_start")
    if cache is None:
        return match_exact(scores)
    # float32 scores go to the solver as they are (it computes in float64): no float64 copy
    values = torch.from_numpy(cache._solve(scores.cpu().numpy(), options["block"]))
    values = values.to(scores.device)
    return values, values.clone()


# name -> solver(scores (B, S, S), norms_x (B, S), norms_y (B, S), options) -> (value, upper);
# options hold the keyword options of semantic_rsm and the block's segments ("block")
_MATCHERS: dict[str, Callable[[Tensor, Tensor, Tensor, dict], MatchResult]] = {
    "auction": lambda scores, nx, ny, opts: _match_auction(scores, nx, ny, opts["tol"]),
    "exact": lambda scores, nx, ny, opts: _match_exact(scores, opts),
    "greedy": lambda scores, nx, ny, opts: match_greedy(scores),
    "windowed": lambda scores, nx, ny, opts: match_windowed(scores, nx, ny, opts["window"]),
}

# Score matrices held per block on CPU; bounds memory, independent of N. The auction's cost per
# bidding round is mostly fixed, so it gets larger blocks; on CUDA blocks fill free memory.
_BLOCK_ENTRIES = {"auction": 2**23}
_DEFAULT_BLOCK_ENTRIES = 2**21
# Bytes of device memory the auction uses per score entry (float64 copies and scratch).
_AUCTION_BYTES_PER_ENTRY = 40

Segment = tuple[int, int, int]  # (row i, first column j0, end column j1)


def _default_block_pairs(size: int, matcher: str, device: torch.device) -> int:
    """Pairs per block: from free memory for torch matchers on CUDA, else a fixed budget."""
    if device.type == "cuda" and matcher in TORCH_MATCHERS:
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2 // (_AUCTION_BYTES_PER_ENTRY * size * size))
    entries = _BLOCK_ENTRIES.get(matcher, _DEFAULT_BLOCK_ENTRIES)
    # scipy's solves dominate and need no big matmuls: small blocks balance the threads' load
    most = 8192 if matcher in TORCH_MATCHERS else 256
    return max(1, min(most, entries // (size * size)))


def _check_pair(x: Tensor, y: Tensor | None) -> None:
    """Validate both inputs; with ``y=None`` an RSM needs at least two samples."""
    _check_representations(x, "x", min_samples=2 if y is None else 1)
    if y is None:
        return
    _check_representations(y, "y")
    if x.ndim != y.ndim or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            "Expected `x` and `y` to have the same shape after the sample dimension, "
            f"but got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.device != y.device:
        raise ValueError(f"Expected `x` and `y` on one device, but got {x.device} and {y.device}.")


def _prepare(x: Tensor, y: Tensor | None, max_positions: int | None) -> tuple[Tensor, Tensor]:
    """Concept vectors ``(N, S, C)`` and ``(M, S, C)`` in float32 or float64, detached.

    The inputs must have passed :func:`_check_pair` (each tensor is scanned for NaN/Inf once).
    """
    xs = _reshape_concepts(x.detach(), max_positions)
    ys = xs if y is None else _reshape_concepts(y.detach(), max_positions)
    if xs.dtype not in (torch.float32, torch.float64):
        xs, ys = xs.float(), ys.float()
    return xs, ys


def _squared_norms(concepts: Tensor) -> Tensor:
    """``||X_i||^2`` of each sample in float64, shape ``(N,)``."""
    return concepts.double().square().sum(dim=(1, 2))


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
    solve: Callable[[Tensor, Tensor, Tensor, dict], MatchResult],
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


def _world(distributed: bool | dist.ProcessGroup) -> tuple[int, int]:
    """(rank, world size) to split the blocks over; (0, 1) when not splitting."""
    if not distributed:
        return 0, 1
    if isinstance(distributed, dist.ProcessGroup):
        return dist.get_rank(distributed), dist.get_world_size(distributed)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "Expected an initialised torch.distributed process group with "
            "`distributed=True`, but none is initialised."
        )
    return dist.get_rank(), dist.get_world_size()


def _raise_if_any_rank_failed(
    error: BaseException | None, group: dist.ProcessGroup | None = None
) -> None:
    """Collective: every rank learns whether any rank failed, and all of them raise if so.

    Without it, a rank that fails while solving its blocks would leave the others waiting in
    the all-reduce that gathers the result.
    """
    failed = [None] * dist.get_world_size(group)
    message = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(failed, message, group=group)
    if error is not None:
        raise error
    ranks = [rank for rank, message in enumerate(failed) if message is not None]
    if ranks:
        raise RuntimeError(
            f"semantic_rsm failed on rank {ranks[0]} ({failed[ranks[0]]}); every rank stops."
        )


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
) -> Iterator[tuple[list[Segment], Tensor, Tensor]]:
    """Yield solved blocks, at most ``2 * num_workers`` in flight; Ctrl-C cancels the rest."""
    total = sum(j1 - j0 for block in blocks for _, j0, j1 in block)
    label = progress if isinstance(progress, str) else "semantic RSM"
    bar = tqdm(total=total, disable=not progress, unit="pair", desc=label, leave=False)
    # The small per-block matmuls run fastest on one thread each; the workers use the cores.
    with bar, _intra_op_threads(1):
        if num_workers == 1:
            for block in blocks:
                result = work(block)
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
                for block in todo:
                    pending.add(pool.submit(work, block))
                    if len(pending) >= 2 * num_workers:
                        break
                if not pending:
                    break
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
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
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds on v_ij for every pair, float64 tensors of shape ``(N, M)``.

    ``sq_x`` are the squared norms of ``xs`` (the diagonal when ``symmetric``).
    """
    n, m, size = xs.shape[0], ys.shape[0], xs.shape[1]
    norms_x = xs.norm(dim=2)
    norms_y = norms_x if symmetric else ys.norm(dim=2)
    block_pairs = block_size or _default_block_pairs(size, matcher, xs.device)
    blocks = _segments(n, m, symmetric, block_pairs)
    rank, world = _world(distributed)
    blocks = blocks[rank::world]
    if num_workers is None:
        on_device = xs.is_cuda and matcher in TORCH_MATCHERS
        num_workers = 1 if on_device else len(os.sched_getaffinity(0))
    solve = _MATCHERS[matcher]

    def work(block: list[Segment]) -> tuple[list[Segment], Tensor, Tensor]:
        return _solve_block(xs, ys, norms_x, norms_y, block, solve, options)

    lower = torch.zeros(n, m, dtype=torch.float64, device=xs.device)
    upper = torch.zeros_like(lower)
    error = None
    try:
        for block, value, bound in _run_blocks(
            blocks, work, num_workers, progress if rank == 0 else False
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
        _raise_if_any_rank_failed(error, group)
        _sum_across_ranks(lower, upper, group=group)
    if symmetric:
        diagonal = torch.diag(sq_x)
        lower = lower + lower.T + diagonal
        upper = upper + upper.T + diagonal
    return lower, upper


def _sum_across_ranks(*tensors: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce in place; every entry was filled by exactly one rank, the rest hold zeros."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    for tensor in tensors:
        if device is None or tensor.device == device:
            dist.all_reduce(tensor, group=group)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, group=group)
            tensor.copy_(moved)


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


def semantic_rsm(
    x: Tensor,
    y: Tensor | None = None,
    *,
    kernel: str = "cosine",
    matcher: str = "exact",
    sigma: float | None = None,
    window: int = 8,
    tol: float = 1e-4,
    max_positions: int | None = None,
    block_size: int | None = None,
    num_workers: int | None = None,
    progress: bool | str = False,
    return_gap: bool = False,
    distributed: bool | dist.ProcessGroup = False,
    warm_start: AssignmentCache | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Permutation-invariant (semantic) RSM: kernel of optimally aligned concept vectors.

    Entry ``(i, j)`` is the kernel applied to X_i and Y_j after permuting Y_j's S positions to
    maximise ``sum_s <X_i[s], Y_j[P(s)]>`` (Wald et al., NeurIPS 2024). It is invariant to any
    permutation of either sample's positions, e.g. a circular shift of a feature map.

    Args:
        x: float tensor of shape ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)`` (CPU or CUDA).
        y: optional second set of the same shape after dim 0, ``(M, ...)``; default ``x``.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: ``"exact"`` (optimal, scipy, CPU threads), ``"windowed"`` (sort concept
            vectors by norm, solve consecutive windows of ``window`` exactly), ``"greedy"``
            or ``"auction"`` (batched epsilon-scaling auction in torch, on the inputs' device,
            certified within ``tol``). The approximations return a feasible permutation, so
            their aligned inner product is a **lower bound** on the exact one.
        sigma: RBF bandwidth; default the median heuristic (see :func:`_apply_kernel`).
        window: window size of the ``"windowed"`` matcher.
        tol: the ``"auction"`` matcher stops once each pair's aligned inner product is
            certified within ``tol * |X_i| * |Y_j|`` of the optimum, i.e. within ``tol`` on the
            cosine scale (see ``return_gap`` for the certificate of every entry).
        max_positions: cap on S; larger maps are adaptive-average-pooled (see
            :func:`~lightning_rsm.functional.to_concepts`).
        block_size: pairs per block (default from S: on CPU at most 2M scores and 256 pairs
            for the scipy matchers, 8M scores for the auction and greedy; on CUDA the
            auction's and greedy's blocks fill half the free memory).
        num_workers: solver threads (default: all cores; 1 for the auction and greedy on CUDA).
        progress: show a tqdm progress bar of the pairs solved (on rank 0), labelled with
            ``progress`` when it is a str. Ctrl-C stops the computation between blocks.
        return_gap: also return, per entry, a certified bound on the distance from the exact
            kernel value (0 for ``matcher="exact"``); ``gap.max()`` is the run's largest.
        distributed: ``True`` splits the blocks across the ranks of the initialised
            ``torch.distributed`` process group and gathers the full RSM on every rank; then
            **every rank must call with the same inputs**, and if solving fails on one rank,
            every rank raises. ``False`` (default) computes everything in this process and
            runs no collective, so it is safe inside rank-zero-only code. A
            ``torch.distributed.ProcessGroup`` splits across that group's ranks and runs every
            collective in it (e.g. a group of its own for a thread beside training).
        warm_start: an :class:`~lightning_rsm.functional.AssignmentCache` to start each pair's
            exact solve from its solution in the previous call with this cache and store the
            new one: the same (exact) RSM, cheaper when the features changed little, e.g. one
            cache per monitored layer, evaluated every epoch. Only ``matcher="exact"`` uses it.

    Returns:
        tensor of shape ``(N, M)`` on ``x``'s device (symmetric when ``y`` is None), in
        ``x``'s dtype (float32 for half precision inputs); with ``return_gap`` the pair
        ``(rsm, gap)``. Cosine entries of a sample whose features are all zero are 0.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real tensor.
        TypeError: If ``warm_start`` is not an ``AssignmentCache`` or None.
        ValueError: If a name is unknown, ``x`` has another number of dimensions, fewer than 2
            samples (with ``y=None``), NaN/Inf, or ``x`` and ``y`` differ in S or C.

    Example:
        >>> import torch
        >>> a = torch.rand(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> x = torch.cat([a, a.roll(1, dims=3)])      # same content, shifted one column
        >>> semantic_rsm(x, kernel="cosine")[0, 1]     # the shift costs nothing
        tensor(1.)
    """
    check_rsm_options(kernel, matcher, sigma, window, tol, max_positions)
    check_positive_int(block_size, "block_size", optional=True)
    check_positive_int(num_workers, "num_workers", optional=True)
    if not isinstance(distributed, (bool, dist.ProcessGroup)):
        raise TypeError(
            f"Expected `distributed` to be a bool or a ProcessGroup, but got {distributed!r}."
        )
    if warm_start is not None and not isinstance(warm_start, AssignmentCache):
        raise TypeError(
            "Expected `warm_start` to be an AssignmentCache or None, "
            f"but got {type(warm_start).__name__}."
        )
    _check_pair(x, y)
    xs, ys = _prepare(x, y, max_positions)
    symmetric = y is None
    if matcher != "exact":
        warm_start = None
    elif warm_start is not None:
        warm_start._bind(xs.shape[0], ys.shape[0], xs.shape[1], symmetric)
    sq_x = _squared_norms(xs)
    sq_y = sq_x if symmetric else _squared_norms(ys)
    lower, upper = _assignment_bounds(
        xs,
        ys,
        symmetric,
        matcher,
        {"window": window, "tol": tol, "warm_start": warm_start},
        block_size,
        num_workers,
        progress,
        distributed,
        sq_x,
    )
    if kernel == "rbf" and sigma is None:
        sigma = _median_sigma(lower, sq_x, sq_y, symmetric)
    rsm = _apply_kernel(lower, sq_x, sq_y, kernel, sigma, symmetric)
    if not return_gap:
        return rsm.to(xs.dtype)
    # The kernels are increasing in v, so the upper bound on v bounds the kernel from above.
    gap = _apply_kernel(upper, sq_x, sq_y, kernel, sigma, symmetric) - rsm
    return rsm.to(xs.dtype), gap.clamp_min(0.0).to(xs.dtype)


def spatio_semantic_rsm(
    x: Tensor,
    y: Tensor | None = None,
    *,
    kernel: str = "cosine",
    sigma: float | None = None,
) -> Tensor:
    """Classic (spatio-semantic) RSM: kernel of the flattened representations.

    Two samples are only similar when the same content sits at the same position; this is the
    baseline the semantic RSM is compared with, and equals it when S = 1.

    Args:
        x: float tensor of shape ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)``.
        y: optional second set of the same shape after dim 0; default ``x``.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        sigma: RBF bandwidth; default the median heuristic.

    Returns:
        tensor of shape ``(N, M)`` on ``x``'s device, in ``x``'s dtype.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real tensor.
        ValueError: If ``kernel`` is unknown, ``x`` has another number of dimensions, fewer than
            2 samples (with ``y=None``), NaN/Inf, or ``x`` and ``y`` differ after dim 0.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[[1.0, 0.0]]]])         # (1, 1, 1, 2): one channel, two positions
        >>> spatio_semantic_rsm(torch.cat([a, a.roll(1, dims=3)]))
        tensor([[1., 0.],
                [0., 1.]])
    """
    check_rsm_options(kernel, sigma=sigma)
    _check_pair(x, y)
    xs, ys = _prepare(x, y, None)
    symmetric = y is None
    flat_x, flat_y = xs.flatten(1), ys.flatten(1)
    traces = (flat_x @ flat_y.T).double()
    sq_x = _squared_norms(xs)
    sq_y = sq_x if symmetric else _squared_norms(ys)
    if symmetric:
        traces = (traces + traces.T) / 2
        traces.diagonal().copy_(sq_x)
    return _apply_kernel(traces, sq_x, sq_y, kernel, sigma, symmetric).to(xs.dtype)
