"""Input checks shared by the RSM quality and comparison functions; each helper only raises."""

from __future__ import annotations

from torch import Tensor


def _check_finite(x: Tensor, name: str) -> None:
    """Raise if a floating tensor holds NaN or Inf, naming how many and the first index."""
    if not x.is_floating_point():
        return
    bad = ~x.isfinite()
    n_bad = int(bad.sum())
    if n_bad:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"Expected `{name}` to be finite, but got {n_bad} NaN/Inf values; "
            f"the first at index {first}."
        )


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
    _check_finite(rsm, name)
