"""Checks of the tensors a user passes: representations, RSMs, score blocks, finiteness. Each
only raises, with a one-line message that names the argument, says what was expected, then what
it got."""

from __future__ import annotations

import torch
from torch import Tensor

_SHAPES = "(N, C, H, W), (N, T, D) or (N, D)"
# Dtypes of representations: floats with NaN/Inf checks and the integers (converted to float32);
# not float8, whose tensors support neither the checks nor the products.
_REAL_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
)


def check_rsm(rsm: object, name: str = "rsm") -> None:
    """Raise if ``rsm`` is not a finite, floating, square ``(N, N)`` tensor with N >= 2."""
    if not isinstance(rsm, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(rsm).__name__}.")
    if rsm.ndim != 2 or rsm.shape[0] != rsm.shape[1]:
        raise ValueError(
            f"Expected `{name}` to be a square matrix of shape (N, N), "
            f"but got shape {tuple(rsm.shape)}."
        )
    if rsm.shape[0] < 2:
        raise ValueError(
            f"Expected `{name}` to hold at least 2 samples, but got shape {tuple(rsm.shape)}."
        )
    if not rsm.is_floating_point():
        raise TypeError(f"Expected `{name}` to have a floating dtype, but got {rsm.dtype}.")
    check_finite(rsm, name)


def check_scores(scores: object, name: str = "scores") -> None:
    """Raise if ``scores`` is not a block of B finite, real, square ``(S, S)`` score matrices.

    The one check of every solver in :mod:`lightning_rsm.functional.matching`. Checks run in
    order of cost: type, shape (``(B, S, S)`` with ``S >= 1``; ``B`` may be 0), dtype (a float
    or integer dtype, see :func:`check_representations`), finiteness.

    Example:
        >>> check_scores(torch.zeros(2, 3, 4))
        Traceback (most recent call last):
        ...
        ValueError: Expected `scores` to be a block of non-empty square matrices of shape \
(B, S, S), but got shape (2, 3, 4).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(scores).__name__}.")
    if scores.ndim != 3 or scores.shape[1] != scores.shape[2] or scores.shape[1] == 0:
        raise ValueError(
            f"Expected `{name}` to be a block of non-empty square matrices of shape (B, S, S), "
            f"but got shape {tuple(scores.shape)}."
        )
    if scores.dtype not in _REAL_DTYPES:
        raise TypeError(f"Expected `{name}` to have a real dtype, but got {scores.dtype}.")
    check_finite(scores, name)


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if a floating tensor holds NaN or Inf, naming how many and where.

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "x")
        Traceback (most recent call last):
        ...
        ValueError: Expected `x` to be finite, but got 1 NaN/Inf values; the first at index (1,).
    """
    # A NaN or Inf makes the sum NaN or Inf: a finite sum (one cheap pass) clears the tensor.
    if not x.is_floating_point() or bool(x.sum().isfinite()):
        return
    bad = ~x.isfinite()
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"Expected `{name}` to be finite, but got {n_bad} NaN/Inf values; "
            f"the first at index {first}."
        )


def check_representations(x: object, name: str = "x", *, min_samples: int = 1) -> None:
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
    if x.dtype not in _REAL_DTYPES:
        raise TypeError(
            f"Expected `{name}` to have a real dtype ({', '.join(map(str, _REAL_DTYPES))}), "
            f"but got {x.dtype}."
        )
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
