"""Layer representations as sets of concept vectors: validation, reshaping and pooling.

A layer's output for N samples becomes a tensor of shape ``(N, S, C)``: S concept vectors
of C channels each.

==================  ==================  =========================
input shape         meaning             concept vectors
==================  ==================  =========================
``(N, C, H, W)``    conv feature maps   S = H * W vectors of C
``(N, T, D)``       tokens              S = T vectors of D
``(N, D)``          pooled / linear     S = 1 vector of D
==================  ==================  =========================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_rsm.functional.options import check_positive_int

_SHAPES = "(N, C, H, W), (N, T, D) or (N, D)"


def _check_representations(x: object, name: str = "x", *, min_samples: int = 1) -> None:
    """Raise if ``x`` is not a finite floating tensor of a supported shape.

    Checks run in order of cost: type, number of dimensions, sample count, dtype, finiteness.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"Expected `{name}` to be representations of shape {_SHAPES}, "
            f"but got shape {tuple(x.shape)}."
        )
    if x.shape[0] < min_samples:
        raise ValueError(
            f"Expected `{name}` to hold at least {min_samples} samples along dim 0, "
            f"but got shape {tuple(x.shape)}."
        )
    if not (
        x.is_floating_point()
        or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
    ):
        raise TypeError(f"Expected `{name}` to have a real dtype, but got {x.dtype}.")
    if any(d == 0 for d in x.shape[1:]):
        raise ValueError(
            f"Expected `{name}` to have no empty dimension, but got shape {tuple(x.shape)}."
        )
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in bad.nonzero()[0])
            n_samples = int(bad.flatten(1).any(1).sum())
            raise ValueError(
                f"Expected `{name}` to be finite, but got {n_bad} NaN/Inf values in {n_samples} "
                f"sample(s); the first at index {first}."
            )


def _pooled_grid(height: int, width: int, max_positions: int) -> tuple[int, int]:
    """Largest grid of at most ``max_positions`` cells that keeps the aspect ratio."""
    scale = math.sqrt(max_positions / (height * width))
    h = max(1, min(height, math.floor(height * scale)))
    w = max(1, min(width, max_positions // h))
    return h, w


def to_concepts(x: Tensor, *, max_positions: int | None = None, name: str = "x") -> Tensor:
    """Reshape a layer's representations into N sets of concept vectors.

    Args:
        x: tensor of shape ``(N, C, H, W)``, ``(N, T, D)`` or ``(N, D)``.
        max_positions: if given and the sample has more positions than this, positions are
            averaged with adaptive average pooling (feature maps keep their aspect ratio; token
            sequences are pooled along T) until at most ``max_positions`` remain. Pooling
            trades spatial detail for speed: the LAP per pair costs about O(S^3).
        name: the argument's name in error messages.

    Returns:
        floating tensor of shape ``(N, S, C)`` with S = H * W, T or 1 (after pooling).

    Raises:
        TypeError: If ``x`` is not a tensor of real dtype.
        ValueError: If ``x`` has another number of dimensions, an empty dimension or NaN/Inf,
            or ``max_positions`` is not a positive int.

    Example:
        >>> import torch
        >>> to_concepts(torch.zeros(5, 16, 7, 7)).shape
        torch.Size([5, 49, 16])
        >>> to_concepts(torch.zeros(5, 16, 14, 14), max_positions=49).shape
        torch.Size([5, 49, 16])
        >>> to_concepts(torch.zeros(5, 10)).shape
        torch.Size([5, 1, 10])
    """
    check_positive_int(max_positions, "max_positions", optional=True)
    _check_representations(x, name)
    return _reshape_concepts(x, max_positions)


def _reshape_concepts(x: Tensor, max_positions: int | None) -> Tensor:
    """:func:`to_concepts` without the checks, for inputs that were already validated."""
    if not x.is_floating_point():
        x = x.float()
    if x.ndim == 2:
        return x.unsqueeze(1)
    if x.ndim == 4:
        n, c, h, w = x.shape
        if max_positions is not None and h * w > max_positions:
            x = F.adaptive_avg_pool2d(x, _pooled_grid(h, w, max_positions))
        return x.flatten(2).transpose(1, 2)
    if max_positions is not None and x.shape[1] > max_positions:
        x = F.adaptive_avg_pool1d(x.transpose(1, 2), max_positions).transpose(1, 2)
    return x
