"""The RSM check shared by the quality and comparison functions; it only raises."""

from __future__ import annotations

from torch import Tensor

from lightning_rsm.functional.options import check_finite


def _check_rsm(rsm: object, name: str = "rsm") -> None:
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
