"""RSM pictures: the one sample order by label, colour scales and heatmaps as RGB images."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from torch import Tensor


def label_order(labels: Tensor) -> Tensor:
    """The sample order that makes samples of one label contiguous; used by every RSM picture.

    Class ids ``(N,)`` sort by id. Multi-hot labels ``(N, L)`` sort by their first positive
    label, and samples without any label come last. The sort is stable, so samples keep their
    probe order within a group.

    Args:
        labels: tensor of shape ``(N,)`` or ``(N, L)``.

    Returns:
        int64 tensor of shape ``(N,)``, a permutation of ``0 .. N - 1`` (on the CPU).

    Example:
        >>> label_order(torch.tensor([[0, 0], [0, 1], [1, 1]]))
        tensor([2, 1, 0])
    """
    labels = labels.detach().cpu()
    if labels.ndim == 1:
        return torch.sort(labels, stable=True).indices
    positive = labels != 0
    first = torch.where(positive.any(1), positive.int().argmax(1), labels.shape[1])
    return torch.sort(first, stable=True).indices


def sort_by_label(rsm: Tensor, labels: Tensor | None) -> Tensor:
    """Reorder rows and columns of an RSM by :func:`label_order` (no change without labels).

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
    order = label_order(labels).to(rsm.device)
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


def default_colour_range(kernel: str, rsms: Sequence[Tensor]) -> tuple[float, float]:
    """A colour scale for heatmaps of RSMs of one kernel, to be fixed for a whole run.

    ``(0, 1)`` for ``"rbf"``; for ``"cosine"`` ``(0, 1)`` when no entry is negative, else
    ``(-1, 1)``; for ``"inner"`` the range of the values (widened by 1 if they are constant).

    Example:
        >>> default_colour_range("cosine", [torch.tensor([[1.0, -0.2], [-0.2, 1.0]])])
        (-1.0, 1.0)
    """
    if kernel == "rbf":
        return 0.0, 1.0
    low = min(float(rsm.min()) for rsm in rsms)
    high = max(float(rsm.max()) for rsm in rsms)
    if kernel == "cosine":
        return (0.0 if low >= 0 else -1.0), 1.0
    return (low, high) if high > low else (low - 1.0, high + 1.0)


def rsm_images(
    rsms: Mapping[str, Mapping[str, Tensor]],
    labels: Tensor | None,
    ranges: Mapping[str, tuple[float, float]],
    layer_rsa: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """The monitor's pictures: a heatmap per layer and kind, and the layer x layer RSA.

    Args:
        rsms: ``{layer: {kind: (N, N) RSM}}``.
        labels: ``(N,)`` or ``(N, L)`` labels to sort the samples by (:func:`label_order`).
        ranges: ``{layer: (vmin, vmax)}`` colour scale of each layer's heatmaps.
        layer_rsa: ``(L, L)`` RSA matrix of the layers, drawn on ``[-1, 1]``.

    Returns:
        ``{tag: uint8 (H, W, 3) image}`` with tags ``rsm/<layer>/<kind>/heatmap`` and
        ``rsm/layer_rsa``.

    Example:
        >>> images = rsm_images({"fc": {"semantic": torch.eye(3)}}, None, {"fc": (0.0, 1.0)})
        >>> {tag: image.shape for tag, image in images.items()}
        {'rsm/fc/semantic/heatmap': (258, 258, 3)}
    """
    images = {}
    for layer, kinds in rsms.items():
        vmin, vmax = ranges[layer]
        for kind, rsm in kinds.items():
            images[f"rsm/{layer}/{kind}/heatmap"] = heatmap_rgb(
                sort_by_label(rsm, labels), vmin, vmax
            )
    if layer_rsa is not None:
        images["rsm/layer_rsa"] = heatmap_rgb(layer_rsa, -1.0, 1.0)
    return images
