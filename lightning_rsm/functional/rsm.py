"""Semantic (permutation-invariant) and spatio-semantic (flattened) RSMs.

For samples X_i, Y_j of S concept vectors each (``(S, C)`` matrices) the semantic RSM needs
one number per pair, the optimal assignment value

    v_ij = max over permutations P of sum_s <X_i[s], Y_j[P(s)]>,

because aligning Y_j by P keeps its norm: every kernel follows from v_ij and the two norms
(:mod:`~lightning_rsm.functional.similarity`), and no permuted copy of any tensor is ever built.
The spatio-semantic baseline is the same with the identity permutation, ``trace(X_i @ Y_j.T)``.

Pairs are solved in blocks on a thread pool (:mod:`~lightning_rsm.functional.pairs`), only
``i < j`` with ``y=None``: the diagonal is exact by construction (the identity permutation is
optimal for a sample against itself). With ``distributed`` the blocks are split across the
ranks of the process group and the result gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_rsm.functional.checks import check_representations
from lightning_rsm.functional.matching import AssignmentCache
from lightning_rsm.functional.options import (
    check_positive_int,
    check_rsm_options,
)
from lightning_rsm.functional.pairs import _assignment_bounds
from lightning_rsm.functional.representations import _reshape_concepts
from lightning_rsm.functional.similarity import _apply_kernel, _median_sigma, _squared_norms


def _check_pair(x: Tensor, y: Tensor | None) -> None:
    """Validate both inputs; with ``y=None`` an RSM needs at least two samples."""
    check_representations(x, "x", min_samples=2 if y is None else 1)
    if y is None:
        return
    check_representations(y, "y")
    if x.ndim != y.ndim or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            "Expected `x` and `y` to have the same shape after the sample dimension, "
            f"but got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.device != y.device:
        raise ValueError(f"Expected `x` and `y` on one device, but got {x.device} and {y.device}.")
    if x.dtype != y.dtype:
        raise TypeError(f"Expected `y` to have the dtype of `x` ({x.dtype}), but got {y.dtype}.")


class _Concepts(NamedTuple):
    """Concept vectors ready for products, and the scale they were brought to.

    Sample i of ``xs`` is ``X_i / (rel_x[i] * unit)``: ``rel_x``/``rel_y`` are float64 powers of
    two at most 1 (None when no sample needed scaling) and ``unit`` a power of two, so products
    of scaled samples are the true ones times exact powers of two.
    """

    xs: Tensor
    ys: Tensor
    rel_x: Tensor | None
    rel_y: Tensor | None
    unit: float


def _power_of_two_scales(amax: Tensor) -> Tensor:
    """float64 ``2^e`` with ``amax / 2^e`` in [0.5, 1) (1 where ``amax`` is 0)."""
    exponent = torch.frexp(amax)[1].clamp(-1000, 1000)
    return torch.ldexp(torch.ones_like(amax), exponent)


def _prepare(x: Tensor, y: Tensor | None, max_positions: int | None) -> _Concepts:
    """Concept vectors ``(N, S, C)`` and ``(M, S, C)`` in float32 or float64, detached.

    Where products of the samples could overflow (or underflow) the dtype, each sample is divided
    by a power of two (exact) that brings its largest entry into [0.5, 1): finite inputs give
    finite products. Otherwise nothing is scaled (the results are bit for bit those of the
    unscaled inputs, and warm starts see the same scores). The inputs must have passed
    :func:`_check_pair` (each tensor is scanned for NaN/Inf once).
    """
    xs = _reshape_concepts(x.detach(), max_positions)
    ys = xs if y is None else _reshape_concepts(y.detach(), max_positions)
    if xs.dtype not in (torch.float32, torch.float64):
        xs, ys = xs.float(), ys.float()
    amax_x = xs.abs().flatten(1).amax(1).double()
    amax_y = amax_x if y is None else ys.abs().flatten(1).amax(1).double()
    both = torch.cat([amax_x, amax_y])
    nonzero = both[both > 0]
    if nonzero.numel() == 0:
        return _Concepts(xs, ys, None, None, 1.0)
    finfo = torch.finfo(xs.dtype)
    hi, lo = float(nonzero.max()), float(nonzero.min())
    # a product of two samples sums S * C terms of at most hi^2; squares of the smallest
    # sample's entries must stay normal numbers
    if hi * hi * xs.shape[1] * xs.shape[2] <= finfo.max / 4 and lo * lo >= finfo.tiny / finfo.eps:
        return _Concepts(xs, ys, None, None, 1.0)
    scale_x = _power_of_two_scales(amax_x)
    scale_y = scale_x if y is None else _power_of_two_scales(amax_y)
    unit = float(torch.cat([scale_x, scale_y]).max())

    def scaled(concepts: Tensor, scale: Tensor) -> Tensor:
        return (concepts.double() / scale.view(-1, 1, 1)).to(concepts.dtype)

    xs_scaled = scaled(xs, scale_x)
    ys_scaled = xs_scaled if y is None else scaled(ys, scale_y)
    return _Concepts(xs_scaled, ys_scaled, scale_x / unit, scale_y / unit, unit)


def _in_units(values: Tensor, sq_x: Tensor, sq_y: Tensor, concepts: _Concepts) -> tuple:
    """Inner products and squared norms of scaled samples, in multiples of ``unit^2``."""
    if concepts.rel_x is None:
        return values, sq_x, sq_y
    rel_x, rel_y = concepts.rel_x, concepts.rel_y
    return values * rel_x.unsqueeze(1) * rel_y.unsqueeze(0), sq_x * rel_x**2, sq_y * rel_y**2


def _check_representable(values: Tensor, unit: float, dtype: torch.dtype, names: str) -> None:
    """Raise if inner products ``values * unit^2`` do not fit ``dtype`` (``values`` float64)."""
    largest = float(values.abs().max()) if values.numel() else 0.0
    limit = torch.finfo(dtype).max
    if largest > limit / unit / unit:
        exponent = math.log10(largest) + 2 * math.log10(unit)
        raise ValueError(
            f"Expected the inner products of {names} to fit in {dtype} (at most {limit:.3g}), "
            f"but the largest is about 1e{exponent:.0f}; scale the input down or use "
            "kernel='cosine' or 'rbf'."
        )


def _kernel(
    values: Tensor,
    sq_x: Tensor,
    sq_y: Tensor,
    kernel: str,
    sigma: float | None,
    symmetric: bool,
    concepts: _Concepts,
    dtype: torch.dtype | None,
) -> Tensor:
    """:func:`_apply_kernel` on products of scaled samples: the kernel of the true samples.

    ``sigma`` is in the units of the true samples. Inner products that do not fit ``dtype``
    raise (None: no check).
    """
    if kernel == "cosine":  # the scales cancel, whatever the range between samples
        return _apply_kernel(values, sq_x, sq_y, kernel, sigma, symmetric)
    values, sq_x, sq_y = _in_units(values, sq_x, sq_y, concepts)
    unit = concepts.unit
    if kernel == "inner":
        if dtype is not None:
            _check_representable(values, unit, dtype, "`x`" if symmetric else "`x` and `y`")
        return values * unit * unit if unit != 1.0 else values
    if kernel == "rbf" and sigma is not None:
        sigma = sigma / unit
    return _apply_kernel(values, sq_x, sq_y, kernel, sigma, symmetric)


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
    should_stop: Callable[[], bool] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Permutation-invariant (semantic) RSM: kernel of optimally aligned concept vectors.

    Entry ``(i, j)`` is the kernel applied to X_i and Y_j after permuting Y_j's S positions to
    maximise ``sum_s <X_i[s], Y_j[P(s)]>`` (Wald et al., NeurIPS 2024). It is invariant to any
    permutation of either sample's positions, e.g. a circular shift of a feature map.

    Args:
        x: float tensor of shape ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)`` (CPU or CUDA).
        y: optional second set of the same shape after dim 0, ``(M, ...)``; default ``x``.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: ``"exact"`` (optimal: Jonker-Volgenant compiled with numba, else scipy; CPU
            threads), ``"windowed"`` (sort concept vectors by norm, solve consecutive windows
            of ``window`` exactly), ``"greedy"`` or ``"auction"`` (batched epsilon-scaling
            auction in torch, on the inputs' device, certified within ``tol``). The
            approximations return a feasible permutation, so their aligned inner product is a
            **lower bound** on the exact one.
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
        should_stop: optional callable without arguments, e.g. ``threading.Event().is_set``,
            asked between blocks of pairs (before each block starts, after each one ends, and at
            least every half second while threads solve); once it returns True the computation
            stops and raises :class:`~lightning_rsm.functional.RSMCancelled`. The threads end
            with the blocks they are solving, so the call returns within about one block's
            time. A ``warm_start`` cache stays valid (it keeps the pairs solved so far).

    Returns:
        tensor of shape ``(N, M)`` on ``x``'s device (symmetric when ``y`` is None), in
        ``x``'s dtype (float32 for half precision inputs); with ``return_gap`` the pair
        ``(rsm, gap)``. Cosine entries of a sample whose features are all zero are 0.

    Raises:
        TypeError: If ``x`` or ``y`` is not a real tensor (float8 is not supported), or ``y``
            has another dtype than ``x``.
        TypeError: If ``warm_start`` is not an ``AssignmentCache`` or None, or ``should_stop``
            is not callable or None.
        ValueError: If a name is unknown, ``x`` has another number of dimensions, fewer than 2
            samples (with ``y=None``), NaN/Inf, or ``x`` and ``y`` differ in S or C.
        ValueError: If ``kernel="inner"`` and an inner product does not fit the result's dtype
            (the cosine and rbf kernels of finite inputs are always finite).
        RSMCancelled: If ``should_stop`` returned True.

    Example:
        >>> import torch
        >>> a = torch.rand(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> x = torch.cat([a, a.roll(1, dims=3)])      # same content, shifted one column
        >>> semantic_rsm(x, kernel="cosine")[0, 1]     # the shift costs nothing
        tensor(1.)
    """
    check_rsm_options(kernel, matcher, sigma, window, tol, max_positions)
    check_positive_int(block_size, "block_size", optional=True)
    if should_stop is not None and not callable(should_stop):
        raise TypeError(f"Expected `should_stop` to be callable or None, but got {should_stop!r}.")
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
    concepts = _prepare(x, y, max_positions)
    xs, ys = concepts.xs, concepts.ys
    symmetric = y is None
    sq_x = _squared_norms(xs)
    sq_y = sq_x if symmetric else _squared_norms(ys)
    if kernel == "inner" and symmetric:  # the diagonal holds the squared norms: fail early
        _kernel(sq_x.diag(), sq_x, sq_y, kernel, sigma, symmetric, concepts, xs.dtype)
    if matcher != "exact":
        warm_start = None
    elif warm_start is not None:
        warm_start.bind(xs.shape[0], ys.shape[0], xs.shape[1], symmetric)
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
        should_stop,
    )
    if kernel == "rbf" and sigma is None:
        sigma = _median_sigma(*_in_units(lower, sq_x, sq_y, concepts), symmetric) * concepts.unit
    rsm = _kernel(lower, sq_x, sq_y, kernel, sigma, symmetric, concepts, xs.dtype)
    if not return_gap:
        return rsm.to(xs.dtype)
    # The kernels are increasing in v, so the upper bound on v bounds the kernel from above.
    gap = _kernel(upper, sq_x, sq_y, kernel, sigma, symmetric, concepts, None) - rsm
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
        TypeError: If ``x`` or ``y`` is not a real tensor (float8 is not supported), or ``y``
            has another dtype than ``x``.
        ValueError: If ``kernel`` is unknown, ``x`` has another number of dimensions, fewer than
            2 samples (with ``y=None``), NaN/Inf, or ``x`` and ``y`` differ after dim 0.
        ValueError: If ``kernel="inner"`` and an inner product does not fit the result's dtype.

    Example:
        >>> import torch
        >>> a = torch.tensor([[[[1.0, 0.0]]]])         # (1, 1, 1, 2): one channel, two positions
        >>> spatio_semantic_rsm(torch.cat([a, a.roll(1, dims=3)]))
        tensor([[1., 0.],
                [0., 1.]])
    """
    check_rsm_options(kernel, sigma=sigma)
    _check_pair(x, y)
    concepts = _prepare(x, y, None)
    xs, ys = concepts.xs, concepts.ys
    symmetric = y is None
    flat_x, flat_y = xs.flatten(1), ys.flatten(1)
    traces = (flat_x @ flat_y.T).double()
    sq_x = _squared_norms(xs)
    sq_y = sq_x if symmetric else _squared_norms(ys)
    if symmetric:
        traces = (traces + traces.T) / 2
        traces.diagonal().copy_(sq_x)
    return _kernel(traces, sq_x, sq_y, kernel, sigma, symmetric, concepts, xs.dtype).to(xs.dtype)
