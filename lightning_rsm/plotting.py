"""RSM heatmaps as RGB images (for TensorBoard and the command line)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import torch
from torch import Tensor


def sort_by_label(rsm: Tensor, labels: Tensor | None) -> Tensor:
    """Reorder rows and columns of an RSM so that samples of one label are contiguous.

    The sort is stable, so samples keep their probe order within a label. Multi-label
    ``(N, L)`` labels sort by their first positive label.

    Args:
        rsm: tensor of shape ``(N, N)``.
        labels: tensor of shape ``(N,)`` or ``(N, L)``, or ``None`` (no reordering).

    Returns:
        tensor of shape ``(N, N)``.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.1, 0.9], [0.1, 1.0, 0.2], [0.9, 0.2, 1.0]])
        >>> sort_by_label(rsm, torch.tensor([0, 1, 0]))
        tensor([[1.0000, 0.9000, 0.1000],
                [0.9000, 1.0000, 0.2000],
                [0.1000, 0.2000, 1.0000]])
    """
    if labels is None:
        return rsm
    keys = labels if labels.ndim == 1 else (labels != 0).int().argmax(dim=1)
    order = torch.sort(keys.cpu(), stable=True).indices
    return rsm[order][:, order]


def heatmap_rgb(
    matrix: Tensor,
    vmin: float,
    vmax: float,
    *,
    cmap: str = "viridis",
    min_size: int = 256,
) -> np.ndarray:
    """Colour a matrix with a fixed colour scale and upscale it (nearest) for display.

    Values are mapped linearly from ``[vmin, vmax]`` onto the colormap and clipped outside it,
    so images made with the same ``vmin``/``vmax`` (e.g. across epochs) compare by colour.

    Args:
        matrix: tensor of shape ``(N, M)``.
        vmin: value shown with the colormap's first colour.
        vmax: value shown with the colormap's last colour; greater than ``vmin``.
        cmap: a matplotlib colormap name.
        min_size: each cell is repeated until the image is at least this many pixels tall.

    Returns:
        uint8 array of shape ``(H, W, 3)``.

    Raises:
        ValueError: If ``matrix`` is not 2D or ``vmax <= vmin``.

    Example:
        >>> image = heatmap_rgb(torch.eye(2), 0.0, 1.0, min_size=4)
        >>> image.shape, image.dtype
        ((4, 4, 3), dtype('uint8'))
        >>> image[0, 0].tolist(), image[0, 3].tolist()    # viridis' last and first colours
        ([253, 231, 37], [68, 1, 84])
    """
    if matrix.ndim != 2:
        raise ValueError(
            f"Expected `matrix` to be a 2D tensor, but got shape {tuple(matrix.shape)}."
        )
    if not vmax > vmin:
        raise ValueError(f"Expected `vmax` > `vmin`, but got vmin={vmin} and vmax={vmax}.")
    values = ((matrix.detach().double().cpu() - vmin) / (vmax - vmin)).clamp(0.0, 1.0).numpy()
    rgb = matplotlib.colormaps[cmap](values)[..., :3]
    repeat = max(1, math.ceil(min_size / matrix.shape[0]))
    rgb = np.repeat(np.repeat(rgb, repeat, axis=0), repeat, axis=1)
    return np.round(rgb * 255).astype(np.uint8)
