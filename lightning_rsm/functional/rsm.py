"""Semantic (permutation-invariant) and spatio-semantic (flattened) RSMs.

For samples X_i, Y_j of S concept vectors each (``(S, C)`` matrices) the semantic RSM needs
one number per pair, the optimal assignment value

    v_ij = max over permutations P of sum_s <X_i[s], Y_j[P(s)]>,

because aligning Y_j by P keeps its norm: every kernel follows from v_ij and the two norms
(:mod:`~lightning_rsm.functional.kernels`), and no permuted copy of any tensor is ever built.
The spatio-semantic baseline is the same with the identity permutation, ``trace(X_i @ Y_j.T)``.

Pairs are solved in blocks on a thread pool (:mod:`~lightning_rsm.functional.pairs`), only
``i < j`` with ``y=None``: the diagonal is exact by construction (the identity permutation is
optimal for a sample against itself). With ``distributed`` the blocks are split across the
ranks of the process group and the result gathered.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_rsm.functional.kernels import _apply_kernel, _median_sigma, _squared_norms
from lightning_rsm.functional.options import (
    check_positive_int,
    check_rsm_options,
)
from lightning_rsm.functional.pairs import _assignment_bounds
from lightning_rsm.functional.representations import _check_representations, _reshape_concepts
from lightning_rsm.functional.warm_start import AssignmentCache


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
