"""Every RSM picture, drawn once: the monitor, ``SemanticRSM.plot``, the CLI and reports call it.

Figures (pure functions returning a matplotlib ``Figure``; no pyplot state, Agg rendering):

==========================  ====================================================================
:func:`evaluation_figures`  all of one evaluation's figures by tag, and the colour ranges to
                            hold for the next evaluation
:func:`heatmap_figure`      one layer's semantic and baseline RSMs side by side, one colour
                            scale and colour bar, class boundaries and ticks, layer and epoch
:func:`rsa_figure`          the layer x layer RSA matrix, names on both axes, values in cells
:func:`neighbours_figure`   fixed query images and their top-k neighbours per RSM, right and
                            wrong marked
:func:`history_figure`      every score over the evaluations, a panel per score
==========================  ====================================================================

Helpers: :func:`label_order` (the one sample order), :func:`draw_rsm` (one RSM into an axes),
:func:`layer_heatmap` (a labelled layer x layer comparison into an axes, also for two runs),
:func:`data_colour_range` and :func:`next_colour_range` (colour scales from the data, and the
rule that keeps one across evaluations), :func:`as_images`, :func:`query_indices`,
:func:`nearest_neighbours`, and :func:`figure_to_rgb` / :func:`figure_to_png` for loggers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
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


# --- colour scales -------------------------------------------------------------------------------


def data_colour_range(
    rsms: Sequence[Tensor], *, percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[float, float]:
    """A colour scale from the data: percentiles of the off-diagonal entries of all ``rsms``.

    The diagonal (self-similarity, often exactly 1) is left out, so a saturated RSM whose
    entries lie in 0.995-1.0 gets a scale of about that width and still shows its structure.
    Entries outside the range are drawn in the end colours (the colour bar shows arrows).
    Non-finite entries are ignored; a constant matrix gets its value +- 0.5.

    Args:
        rsms: tensors of shape ``(N, N)`` (or ``(N, M)``: all entries), drawn on one scale.
        percentiles: the low and high percentile, ``0 <= low < high <= 100``.

    Returns:
        ``(vmin, vmax)`` with ``vmin < vmax``.

    Raises:
        ValueError: If ``rsms`` is empty, a tensor is not 2D or holds no finite off-diagonal
            entry, or ``percentiles`` is not increasing within ``[0, 100]``.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.996, 0.998], [0.996, 1.0, 0.997], [0.998, 0.997, 1.0]])
        >>> low, high = data_colour_range([rsm], percentiles=(0.0, 100.0))
        >>> round(low, 4), round(high, 4)
        (0.996, 0.998)
    """
    low, high = percentiles
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(
            f"Expected `percentiles` (low, high), 0 <= low < high <= 100, but got {percentiles}."
        )
    if len(rsms) == 0:
        raise ValueError("Expected `rsms` to hold at least one (N, N) tensor, but got none.")
    values = np.concatenate([_off_diagonal(rsm) for rsm in rsms])
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("Expected `rsms` to hold a finite off-diagonal entry, but got none.")
    vmin, vmax = (float(v) for v in np.percentile(values, [low, high]))
    return (vmin, vmax) if vmax > vmin else (vmin - 0.5, vmax + 0.5)


def _off_diagonal(rsm: Tensor) -> np.ndarray:
    if rsm.ndim != 2:
        raise ValueError(f"Expected an RSM to be a 2D tensor, but got shape {tuple(rsm.shape)}.")
    values = rsm.detach().double().cpu().numpy()
    n, m = values.shape
    if n == m and n > 1:
        return values[~np.eye(n, dtype=bool)]
    return values.ravel()


def next_colour_range(
    previous: tuple[float, float] | None,
    rsms: Sequence[Tensor],
    *,
    min_overlap: float = 0.5,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> tuple[float, float]:
    """The colour scale of one layer's heatmaps at an evaluation, given the one used before.

    The rule, so that heatmaps of a run compare by colour without blanking a picture: take
    the new data's range ``new`` (:func:`data_colour_range`). Keep ``previous`` while the two
    ranges overlap by at least ``min_overlap`` of the wider of them: the new data then spans at
    least that fraction of the colours, and at most ``1 - min_overlap`` of its spread is
    clipped to the end colours. Otherwise (the RSM drifted or saturated) take ``new``. The
    first evaluation (``previous=None``) takes ``new``. Hold the returned range per layer and
    pass it back at the next evaluation.

    Args:
        previous: the range used at the last evaluation, or ``None``.
        rsms: this evaluation's RSMs of the layer (e.g. semantic and baseline), shape ``(N, N)``.
        min_overlap: fraction in ``(0, 1]``; 1 keeps a range only for data of exactly that range.
        percentiles: passed to :func:`data_colour_range`.

    Returns:
        ``(vmin, vmax)``: ``previous`` or the new data's range.

    Raises:
        ValueError: If ``min_overlap`` is not in ``(0, 1]``, ``previous`` is not an increasing
            pair, or :func:`data_colour_range` rejects ``rsms``.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.3, 0.5], [0.3, 1.0, 0.4], [0.5, 0.4, 1.0]])
        >>> next_colour_range((0.25, 0.6), [rsm], percentiles=(0, 100))  # still fits: kept
        (0.25, 0.6)
        >>> saturated = 1.0 - (1.0 - rsm) / 200                # entries 0.9965 to 0.9975
        >>> low, high = next_colour_range((0.25, 0.6), [saturated], percentiles=(0, 100))
        >>> round(low, 4), round(high, 4)                 # one colour on (0.25, 0.6): new
        (0.9965, 0.9975)
    """
    if not (isinstance(min_overlap, (int, float)) and 0.0 < min_overlap <= 1.0):
        raise ValueError(f"Expected `min_overlap` in (0, 1], but got {min_overlap!r}.")
    if previous is not None and not (len(previous) == 2 and previous[1] > previous[0]):
        raise ValueError(
            f"Expected `previous` to be (vmin, vmax) with vmin < vmax, but got {previous}."
        )
    new = data_colour_range(rsms, percentiles=percentiles)
    if previous is None:
        return new
    overlap = min(previous[1], new[1]) - max(previous[0], new[0])
    wider = max(previous[1] - previous[0], new[1] - new[0])
    return (float(previous[0]), float(previous[1])) if overlap >= min_overlap * wider else new


# --- heatmaps ------------------------------------------------------------------------------------


def _class_blocks(labels: Tensor) -> tuple[list[float], list[float], list[str]]:
    """Boundaries, block centres and ids of the classes of sorted class ids ``(N,)``."""
    ids, counts = torch.unique_consecutive(labels, return_counts=True)
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    boundaries = [end - 0.5 for end in ends[:-1]]
    centres = [(start + end - 1) / 2 for start, end in zip(starts, ends, strict=True)]
    return boundaries, centres, [str(int(i)) for i in ids]


def draw_rsm(
    ax: Axes,
    rsm: Tensor,
    labels: Tensor | None = None,
    *,
    colour_range: tuple[float, float] | None = None,
    cmap: str = "viridis",
    title: str | None = None,
    colour_bar: str | None = None,
) -> AxesImage:
    """Draw one RSM into ``ax``: samples sorted by label, class boundaries and class ticks.

    With class ids ``(N,)`` samples are grouped by :func:`label_order`, thin white lines
    separate the classes (up to 50 classes) and the class ids label the blocks (thinned to at
    most 12 ticks). Multi-hot labels ``(N, L)`` sort by the first positive label, without
    ticks; without labels the probe order is kept.

    Args:
        ax: a matplotlib ``Axes``.
        rsm: tensor of shape ``(N, N)``.
        labels: class ids ``(N,)``, multi-hot ``(N, L)`` or ``None``.
        colour_range: ``(vmin, vmax)``; default :func:`data_colour_range` of ``rsm``.
        cmap: a matplotlib colormap name.
        title: the axes' title.
        colour_bar: when given, a colour bar with this label is added beside ``ax``.

    Returns:
        the ``AxesImage`` (its array is the sorted RSM).

    Raises:
        ValueError: If ``rsm`` is not square or ``labels`` do not have N rows.

    Example:
        >>> from matplotlib.figure import Figure
        >>> ax = Figure().subplots()
        >>> rsm = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]])
        >>> image = draw_rsm(ax, rsm, torch.tensor([0, 1, 0]), colour_range=(0.0, 1.0))
        >>> [t.get_text() for t in ax.get_xticklabels()]
        ['0', '1']
    """
    if rsm.ndim != 2 or rsm.shape[0] != rsm.shape[1]:
        raise ValueError(f"Expected `rsm` of shape (N, N), but got shape {tuple(rsm.shape)}.")
    n = rsm.shape[0]
    if labels is not None and labels.shape[0] != n:
        raise ValueError(
            f"Expected `labels` with N = {n} rows like `rsm`, but got shape {tuple(labels.shape)}."
        )
    vmin, vmax = data_colour_range([rsm]) if colour_range is None else colour_range
    values = sort_by_label(rsm.detach().cpu(), labels).float().numpy()
    smooth = "antialiased" if n > 200 else "nearest"  # many samples: average, do not alias
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, interpolation=smooth)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels is None:
        ax.set_xlabel("sample (probe order)", fontsize=8)
    elif labels.ndim != 1:
        ax.set_xlabel("sample (sorted by first label)", fontsize=8)
    else:
        boundaries, centres, ids = _class_blocks(labels.detach().cpu()[label_order(labels)])
        if len(ids) <= 50 and boundaries:
            ax.hlines(boundaries, -0.5, n - 0.5, color="white", linewidth=0.6, gid="boundaries")
            ax.vlines(boundaries, -0.5, n - 0.5, color="white", linewidth=0.6, gid="boundaries")
        every = math.ceil(len(ids) / 12)
        size = 8 if len(ids) <= 12 else 6
        ax.set_xticks(centres[::every], labels=ids[::every], fontsize=size)
        ax.set_yticks(centres[::every], labels=ids[::every], fontsize=size)
        ax.tick_params(length=0)
        ax.set_xlabel("class", fontsize=8)
    if title is not None:
        ax.set_title(title, fontsize=9)
    if colour_bar is not None:
        _colour_bar(ax.get_figure(), image, [ax], [rsm], colour_bar)
    return image


def _colour_bar(
    fig: Figure | SubFigure, image: AxesImage, axes: list[Axes], rsms: Sequence[Tensor], label: str
) -> None:
    """A colour bar beside ``axes``, with arrows at an end where data lies beyond the scale."""
    vmin, vmax = image.get_clim()
    low = min(float(rsm.min()) for rsm in rsms)
    high = max(float(rsm.max()) for rsm in rsms)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (low < vmin, high > vmax), "both"
    )
    bar = fig.colorbar(image, ax=axes, extend=extend, shrink=0.9)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    bar.formatter.set_useOffset(False)
    bar.update_ticks()


def _when(epoch: int | None, step: int | None) -> str:
    parts = [
        f"{name} {value}" for name, value in (("epoch", epoch), ("step", step)) if value is not None
    ]
    return ", ".join(parts)


def heatmap_figure(
    rsms: Mapping[str, Tensor],
    labels: Tensor | None = None,
    *,
    layer: str = "",
    epoch: int | None = None,
    step: int | None = None,
    colour_range: tuple[float, float] | None = None,
    kernel: str | None = None,
    cmap: str = "viridis",
    figure: Figure | SubFigure | None = None,
) -> Figure | SubFigure:
    """One layer's RSMs side by side (e.g. semantic and baseline) on one colour scale.

    Each panel is drawn by :func:`draw_rsm` (samples sorted by label, class boundaries and
    ticks) under its kind and the range of its off-diagonal entries (so a panel that the shared
    scale shows in one colour still tells its spread); one colour bar serves all panels, with
    arrows where entries lie beyond the scale. The title names the layer, the epoch and the step.

    Args:
        rsms: kind -> tensor of shape ``(N, N)``, in panel order (``{"semantic": ...,
            "baseline": ...}``).
        labels: class ids ``(N,)``, multi-hot ``(N, L)`` or ``None``.
        layer: the layer's name, for the title.
        epoch: shown in the title when given.
        step: shown in the title when given.
        colour_range: ``(vmin, vmax)`` for every panel; default :func:`data_colour_range` of
            all panels together (across evaluations: :func:`next_colour_range`).
        kernel: names the colour bar (``"cosine similarity"``); default ``"similarity"``.
        cmap: a matplotlib colormap name.
        figure: draw into this ``Figure`` or ``SubFigure``; default a new ``Figure``.

    Returns:
        the figure drawn into (no pyplot state: render it with :func:`figure_to_rgb`).

    Raises:
        ValueError: If ``rsms`` is empty, the RSMs differ in shape or are not square, or
            ``colour_range`` is not increasing.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.998, 0.996], [0.998, 1.0, 0.997], [0.996, 0.997, 1.0]])
        >>> fig = heatmap_figure({"semantic": rsm, "baseline": rsm - 0.001}, layer="fc", epoch=3)
        >>> fig.get_suptitle()
        'fc: epoch 3'
        >>> [ax.get_title() for ax in fig.axes[:2]]
        ['semantic (off-diagonal 0.9960 to 0.9980)', 'baseline (off-diagonal 0.9950 to 0.9970)']
    """
    if not rsms:
        raise ValueError("Expected `rsms` to map at least one kind to an (N, N) RSM, but got none.")
    shapes = {tuple(rsm.shape) for rsm in rsms.values()}
    if len(shapes) != 1:
        raise ValueError(f"Expected the RSMs of one layer to share one shape, but got {shapes}.")
    if colour_range is None:
        colour_range = data_colour_range(list(rsms.values()))
    elif not colour_range[1] > colour_range[0]:
        raise ValueError(
            f"Expected `colour_range` (vmin, vmax) with vmin < vmax, but got {colour_range}."
        )
    if figure is None:
        figure = Figure(figsize=(3.6 * len(rsms) + 1.2, 4.2), dpi=100, layout="constrained")
    axes = list(figure.subplots(1, len(rsms), squeeze=False)[0])
    for ax, (kind, rsm) in zip(axes, rsms.items(), strict=True):
        values = torch.from_numpy(_off_diagonal(rsm))
        low, high = (_score_format(values).format(float(v)) for v in (values.min(), values.max()))
        title = f"{kind} (off-diagonal {low} to {high})"
        image = draw_rsm(ax, rsm, labels, colour_range=colour_range, cmap=cmap, title=title)
    _colour_bar(figure, image, axes, list(rsms.values()), f"{kernel or ''} similarity".strip())
    when = _when(epoch, step)
    figure.suptitle(f"{layer}: {when}" if layer and when else layer or when, fontsize=11)
    return figure


def layer_heatmap(
    ax: Axes, values: Tensor, rows: Sequence[str], cols: Sequence[str], method: str
) -> AxesImage:
    """Draw a layer x layer comparison on ``ax``: names on both axes, each value in its cell.

    Correlations on ``[-1, 1]`` with a diverging colormap, CKA (``method="cka"``, in ``[0, 1]``)
    on ``[0, 1]`` with viridis; cell text black or white by the cell's luminance. Used by
    :func:`rsa_figure` (one run's layers) and
    :func:`~lightning_rsm.run_comparison.comparison_figure` (two runs').

    Args:
        ax: the axes to draw on.
        values: tensor of shape ``(len(rows), len(cols))``.
        rows: names down the side.
        cols: names across the bottom.
        method: the comparison method that gave ``values``.

    Returns:
        the ``AxesImage``, for a colour bar.

    Example:
        >>> ax = Figure().subplots()
        >>> layer_heatmap(ax, torch.tensor([[0.9, 0.2]]), ["a"], ["x", "y"], "cka").get_clim()
        (0.0, 1.0)
    """
    vmin, cmap = (0.0, "viridis") if method == "cka" else (-1.0, "RdBu_r")
    array = values.detach().double().cpu().numpy()
    image = ax.imshow(array, vmin=vmin, vmax=1.0, cmap=cmap)
    colours = matplotlib.colormaps[cmap](np.clip((array - vmin) / (1.0 - vmin), 0.0, 1.0))
    size = max(5, min(9, 60 // max(len(rows), len(cols), 1)))
    for i in range(len(rows)):
        for j in range(len(cols)):
            luminance = colours[i, j, :3] @ np.array([0.299, 0.587, 0.114])
            ax.text(
                j,
                i,
                f"{array[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=size,
                color="black" if luminance > 0.5 else "white",
            )
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    return image


def rsa_figure(
    rsa: Tensor,
    layers: Sequence[str],
    *,
    method: str = "spearman",
    epoch: int | None = None,
    step: int | None = None,
) -> Figure:
    """The layer x layer RSA matrix, labelled: layer names on both axes, values in the cells.

    Correlations are drawn on ``[-1, 1]`` with a diverging colormap, CKA on ``[0, 1]``.

    Args:
        rsa: tensor of shape ``(L, L)``, e.g. from :func:`~lightning_rsm.functional.rsa_matrix`.
        layers: the ``L`` layer names, in the order of ``rsa``'s rows.
        method: the comparison method (named in the title; ``"cka"`` selects ``[0, 1]``).
        epoch: shown in the title when given.
        step: shown in the title when given.

    Returns:
        a new ``Figure``.

    Raises:
        ValueError: If ``rsa`` is not square or ``layers`` has another length.

    Example:
        >>> fig = rsa_figure(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), ["conv1", "conv2"])
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['1.00', '0.50', '0.50', '1.00']
    """
    if rsa.ndim != 2 or rsa.shape[0] != rsa.shape[1]:
        raise ValueError(f"Expected `rsa` of shape (L, L), but got shape {tuple(rsa.shape)}.")
    if len(layers) != rsa.shape[0]:
        raise ValueError(
            f"Expected {rsa.shape[0]} names in `layers` like `rsa`'s rows, but got {len(layers)}."
        )
    count = len(layers)
    side = max(3.8, 0.55 * count + 2.4)
    fig = Figure(figsize=(side + 0.8, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = layer_heatmap(ax, rsa, layers, layers, method)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label(f"RSA ({method})", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    when = _when(epoch, step)
    ax.set_title(f"layer x layer RSA ({method})" + (f"\n{when}" if when else ""), fontsize=10)
    return fig


# --- nearest neighbours --------------------------------------------------------------------------


def as_images(inputs: Any, image_fn: Callable[[Any], Any] | None = None) -> Tensor | None:
    """The probe inputs as drawable images ``(N, C, H, W)`` with 1 or 3 channels, or ``None``.

    Without ``image_fn`` a tensor of shape ``(N, 1 | 3, H, W)`` is drawable and anything else
    (tokens, dicts, text) is not: the answer is ``None``, no warning. With ``image_fn`` its
    result must be drawable (the user asked for pictures), or this raises.

    Args:
        inputs: the probe inputs, any type.
        image_fn: maps ``inputs`` to images ``(N, 1 | 3, H, W)`` (e.g. un-normalise, or pick
            a key of a dict).

    Returns:
        the images as a float tensor on the CPU, or ``None``.

    Raises:
        ValueError: If ``image_fn`` returns something other than a tensor of shape
            ``(N, 1 | 3, H, W)``.

    Example:
        >>> as_images(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 1, 8, 8])
        >>> as_images(torch.rand(4, 65, 32)) is None        # tokens: no picture
        True
    """
    images = inputs if image_fn is None else image_fn(inputs)
    drawable = isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] in (1, 3)
    if drawable:
        return images.detach().float().cpu()
    if image_fn is not None:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"Expected `image_fn` to return a tensor of shape (N, 1 | 3, H, W), but got {shape}."
        )
    return None


def query_indices(labels: Tensor | None, n: int, *, max_queries: int = 8) -> list[int]:
    """A fixed, deterministic choice of query samples: one per class, at most ``max_queries``.

    Class ids ``(N,)``: the first sample (in probe order) of each class; with more classes
    than ``max_queries``, classes evenly spaced over the sorted ids. Multi-hot ``(N, L)``: per
    label (evenly spaced likewise) its first sample not yet chosen. No labels: evenly spaced
    samples. The same labels always give the same queries, so pictures compare across
    evaluations.

    Args:
        labels: class ids ``(N,)``, multi-hot ``(N, L)`` or ``None``.
        n: the number of samples N.
        max_queries: a positive int.

    Returns:
        sample indices, in class order.

    Raises:
        ValueError: If ``max_queries`` or ``n`` is not a positive int, or ``labels`` has
            another number of rows than ``n``.

    Example:
        >>> query_indices(torch.tensor([2, 0, 1, 0, 2, 1]), 6)
        [1, 2, 0]
        >>> query_indices(None, 100, max_queries=4)
        [0, 33, 66, 99]
    """
    if not (isinstance(max_queries, int) and max_queries > 0):
        raise ValueError(f"Expected `max_queries` to be a positive int, but got {max_queries!r}.")
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"Expected `n` to be a positive int, but got {n!r}.")
    if labels is None:
        return sorted({round(i) for i in np.linspace(0, n - 1, min(n, max_queries))})
    labels = labels.detach().cpu()
    if labels.shape[0] != n:
        raise ValueError(
            f"Expected `labels` with n = {n} rows, but got shape {tuple(labels.shape)}."
        )
    members = (
        [(labels == c).nonzero().flatten() for c in labels.unique()]
        if labels.ndim == 1
        else [labels[:, c].nonzero().flatten() for c in range(labels.shape[1])]
    )
    members = [m for m in members if len(m)]
    spaced = np.linspace(0, len(members) - 1, min(len(members), max_queries))
    chosen: list[int] = []
    for group in sorted({round(i) for i in spaced}):
        free = [int(i) for i in members[group] if int(i) not in chosen]
        if free:
            chosen.append(free[0])
    return chosen


def nearest_neighbours(rsm: Tensor, queries: Sequence[int], k: int) -> tuple[Tensor, Tensor]:
    """Each query's ``k`` most similar other samples under ``rsm`` (the query itself excluded).

    Ties go to the lower sample index, so the result is deterministic.

    Args:
        rsm: tensor of shape ``(N, N)``.
        queries: sample indices.
        k: a positive int of at most ``N - 1``.

    Returns:
        ``(indices, scores)``, both of shape ``(len(queries), k)``: int64 indices and their
        RSM entries, most similar first.

    Raises:
        ValueError: If ``rsm`` is not square, ``k`` is not in ``[1, N - 1]`` or a query is
            out of range.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, 0.2], [0.9, 0.2, 1.0]])
        >>> nearest_neighbours(rsm, [1], 2)
        (tensor([[0, 2]]), tensor([[0.2000, 0.2000]]))
    """
    if rsm.ndim != 2 or rsm.shape[0] != rsm.shape[1]:
        raise ValueError(f"Expected `rsm` of shape (N, N), but got shape {tuple(rsm.shape)}.")
    n = rsm.shape[0]
    if not (isinstance(k, int) and 1 <= k <= n - 1):
        raise ValueError(f"Expected `k` to be an int in [1, N - 1 = {n - 1}], but got {k!r}.")
    if any(not 0 <= q < n for q in queries):
        raise ValueError(f"Expected `queries` in [0, {n - 1}], but got {list(queries)}.")
    rows = rsm.detach().cpu().double()[list(queries)].clone()
    rows[torch.arange(len(queries)), torch.as_tensor(list(queries), dtype=torch.long)] = -math.inf
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    return order, rsm.detach().cpu()[list(queries)].gather(1, order)


def _label_text(labels: Tensor | None, i: int) -> str:
    if labels is None:
        return f"#{i}"
    if labels.ndim == 1:
        return f"y={int(labels[i])}"
    ids = labels[i].nonzero().flatten().tolist()
    text = ",".join(str(j) for j in ids[:4]) + ("..." if len(ids) > 4 else "")
    return f"y={{{text}}}"


def _relevant(labels: Tensor, i: int, j: int) -> bool:
    if labels.ndim == 1:
        return bool(labels[i] == labels[j])
    return bool(((labels[i] != 0) & (labels[j] != 0)).any())


def _score_format(scores: Tensor) -> str:
    """Enough decimals to tell the shown scores apart (2 to 5), e.g. 4 for 0.9981 vs 0.9979."""
    spread = float(scores.max() - scores.min()) if scores.numel() > 1 else 1.0
    decimals = 2 if spread <= 0 else min(5, max(2, 1 - math.floor(math.log10(spread))))
    return f"{{:.{decimals}f}}"


def _stretched(images: Tensor) -> np.ndarray:
    """Images ``(B, C, H, W)`` as RGB ``(B, H, W, 3)`` in [0, 1], each stretched to its range."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    span = images.amax(dim=(1, 2, 3), keepdim=True) - low
    images = torch.where(span > 0, (images - low) / span.clamp(min=1e-12), torch.zeros_like(images))
    return images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


_RIGHT, _WRONG, _UNKNOWN = "#1a9e3a", "#d62728", "#bbbbbb"


def neighbours_figure(
    rsms: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor | None = None,
    *,
    queries: Sequence[int] | None = None,
    k: int = 5,
    layer: str = "",
    epoch: int | None = None,
    step: int | None = None,
) -> Figure:
    """What a layer calls similar: fixed query images and their top-``k`` neighbours per RSM.

    One row per query (default :func:`query_indices`: one per class, at most 8); beside the
    query, its :func:`nearest_neighbours` under each RSM (e.g. semantic, then baseline), each
    with its RSM entry and label. A green frame marks a neighbour of the query's class (for
    multi-hot labels: sharing a label), a red one any other; without labels frames are grey.
    Each image is contrast stretched to its own range. The images are laid out as one mosaic
    in one axes, which keeps drawing fast.

    Args:
        rsms: kind -> tensor of shape ``(N, N)``, one block of columns each.
        images: ``(N, 1 | 3, H, W)``, e.g. from :func:`as_images`.
        labels: class ids ``(N,)``, multi-hot ``(N, L)`` or ``None``.
        queries: sample indices of the rows; default :func:`query_indices`.
        k: neighbours per query and RSM, at most ``N - 1``.
        layer: the layer's name, for the title.
        epoch: shown in the title when given.
        step: shown in the title when given.

    Returns:
        a new ``Figure``; each neighbour's frame (a ``Rectangle``) and caption (a ``Text``)
        have the gid ``"<kind>/<query>/<rank>"``, each query's ``"query/<query>"``.

    Raises:
        ValueError: If ``rsms`` is empty, ``images`` is not ``(N, 1 | 3, H, W)`` with the
            RSMs' N, or :func:`nearest_neighbours` rejects ``k`` or a query.

    Example:
        >>> rsm = torch.eye(4) + 0.1
        >>> fig = neighbours_figure({"semantic": rsm}, torch.rand(4, 1, 8, 8),
        ...                         torch.tensor([0, 0, 1, 1]), k=2)
        >>> sorted(frame.get_gid() for frame in fig.axes[0].patches)
        ['query/0', 'query/2', 'semantic/0/0', 'semantic/0/1', 'semantic/2/0', 'semantic/2/1']
    """
    if not rsms:
        raise ValueError("Expected `rsms` to map at least one kind to an (N, N) RSM, but got none.")
    n = next(iter(rsms.values())).shape[0]
    if as_images(images) is None or images.shape[0] != n:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(
            f"Expected `images` of shape (N = {n}, 1 | 3, H, W) like the RSMs, but got {shape}."
        )
    labels = None if labels is None else labels.detach().cpu()
    rows = query_indices(labels, n) if queries is None else [int(q) for q in queries]
    found = {kind: nearest_neighbours(rsm, rows, k) for kind, rsm in rsms.items()}
    # the mosaic, in pixels of the images: a cell is a caption band over a padded image
    height, width = images.shape[-2:]
    pad = max(1, round(0.1 * max(height, width)))
    band = round(0.3 * height)
    cell_w, cell_h = width + 2 * pad, height + 2 * pad + band
    gap = cell_w // 3  # between the query column and each block of neighbours
    block_x = [0] + [cell_w + gap + b * (k * cell_w + gap) for b in range(len(rsms))]
    total_w, total_h = block_x[-1] + k * cell_w, len(rows) * cell_h
    canvas = np.ones((total_h, total_w, 3))
    shown = [q for q in rows] + [int(j) for indices, _ in found.values() for j in indices.flatten()]
    pixels = dict(zip(shown, _stretched(images.detach().float().cpu()[shown]), strict=True))
    inch = cell_w / 1.1  # image pixels per inch: a cell is 1.1 inch wide
    header = 0.3 * cell_h
    fig = Figure(figsize=((total_w + pad) / inch, (total_h + header) / inch + 0.55), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.55 / fig.get_size_inches()[1]))
    ax.set_axis_off()

    def cell(x0: int, r: int, sample: int, colour: str, line: float, text: str, gid: str) -> None:
        y0 = r * cell_h + band + pad
        canvas[y0 : y0 + height, x0 + pad : x0 + pad + width] = pixels[sample]
        d = 0.35 * pad
        frame = Rectangle(
            (x0 + pad - 0.5 - d, y0 - 0.5 - d),
            width + 2 * d,
            height + 2 * d,
            fill=False,
            edgecolor=colour,
            linewidth=line,
            gid=gid,
        )
        ax.add_patch(frame)
        ax.text(x0 + cell_w / 2, y0 - pad, text, ha="center", va="bottom", fontsize=8, gid=gid)

    for r, q in enumerate(rows):
        cell(0, r, q, "black", 1.2, _label_text(labels, q), f"query/{q}")
    ax.text(cell_w / 2, -header / 2, "query", ha="center", va="center", fontsize=9)
    # one number format for all blocks, fine enough for the closest-spaced block's scores
    fmt = _score_format(min((s for _, s in found.values()), key=lambda s: float(s.max() - s.min())))
    for x0, (kind, (indices, scores)) in zip(block_x[1:], found.items(), strict=True):
        for r, q in enumerate(rows):
            for rank in range(k):
                j = int(indices[r, rank])
                colour = (
                    _UNKNOWN if labels is None else _RIGHT if _relevant(labels, q, j) else _WRONG
                )
                text = f"{fmt.format(float(scores[r, rank]))} {_label_text(labels, j)}"
                cell(x0 + rank * cell_w, r, j, colour, 2.5, text, f"{kind}/{q}/{rank}")
        ax.text(
            x0 + k * cell_w / 2,
            -header / 2,
            f"{kind}: top {k}",
            ha="center",
            va="center",
            fontsize=9,
        )
    ax.imshow(canvas, extent=(-0.5, total_w - 0.5, total_h - 0.5, -0.5), interpolation="nearest")
    ax.set_xlim(-0.5 - pad, total_w - 0.5)
    ax.set_ylim(total_h - 0.5, -header)
    when = _when(epoch, step)
    title = f"nearest neighbours in {layer}" if layer else "nearest neighbours"
    title += f": {when}" if when else ""
    if labels is not None:
        title += "\n(green frame: same class" + (" / shared label" if labels.ndim > 1 else "")
        title += ", red: other)"
    fig.suptitle(title, fontsize=10, y=0.995, va="top")
    return fig


# --- trajectories --------------------------------------------------------------------------------

_KINDS = ("semantic", "baseline")
_STYLES = {"semantic": "-", "baseline": "--", None: "-"}


def _parse_key(key: str) -> tuple[str, str | None, str] | None:
    """``rsm/<layer>/<kind>/<score>`` -> (layer, kind, score); ``rsm/<layer>/<score>`` ->
    (layer, None, score); ``rsm/time_s`` -> ("", None, "time_s"); anything else -> None."""
    parts = key.split("/")
    if parts[0] != "rsm" or len(parts) < 2:
        return None
    if len(parts) == 2:
        return "", None, parts[1]
    if len(parts) >= 4 and parts[-2] in _KINDS:
        return "/".join(parts[1:-2]), parts[-2], parts[-1]
    return "/".join(parts[1:-1]), None, parts[-1]


def _score_rank(score: str) -> tuple[int, str]:
    for rank, prefix in enumerate(
        ("map", "precision@", "recall@", "f1@", "probability_agreement", "rsa_to_previous", "vs_")
    ):
        if score.startswith(prefix):
            return rank, score
    return (8, score) if score == "time_s" else (7, score)


def _score_title(score: str) -> str:
    named = {
        "map": "mAP",
        "probability_agreement": "probability agreement",
        "rsa_to_previous": "RSA to the previous evaluation",
        "time_s": "evaluation time (s)",
    }
    return named.get(score, f"RSA vs {score[3:]}" if score.startswith("vs_") else score)


def history_figure(
    history: Sequence[Mapping[str, float]],
    *,
    x: str | None = None,
    layers: Sequence[str] | None = None,
) -> Figure:
    """Every score over the evaluations: one panel per score, one colour per layer.

    Reads the monitor's ``history`` keys ``rsm/<layer>/<kind>/<score>`` (semantic solid,
    baseline dashed, same colour per layer), ``rsm/<layer>/rsa_to_previous`` and
    ``rsm/<layer>/vs_<target>`` (solid), and ``rsm/time_s`` (its own panel). An evaluation
    without a key leaves a gap. Panels: mAP, precision@k, recall@k, F1, probability agreement,
    RSA, then the time.

    Args:
        history: one dict per evaluation with ``"epoch"``, ``"step"`` and the score keys.
        x: ``"epoch"`` or ``"step"`` for the horizontal axis; default ``"epoch"`` when every
            evaluation has its own epoch, else ``"step"``.
        layers: the layers to draw, in legend order; default every layer in the history.

    Returns:
        a new ``Figure``; each line has the gid ``"<layer>/<kind>/<score>"`` (``kind`` is
        ``"-"`` for RSA and time).

    Raises:
        ValueError: If ``history`` is empty, ``x`` is not ``"epoch"``, ``"step"`` or ``None``,
            or an evaluation lacks the ``x`` key.

    Example:
        >>> history = [{"epoch": e, "step": 10 * e, "rsm/fc/semantic/map": 0.5 + e / 10,
        ...             "rsm/fc/baseline/map": 0.4} for e in range(3)]
        >>> fig = history_figure(history)
        >>> [(line.get_gid(), line.get_ydata().tolist()) for line in fig.axes[0].lines]
        [('fc/semantic/map', [0.5, 0.6, 0.7]), ('fc/baseline/map', [0.4, 0.4, 0.4])]
    """
    if not history:
        raise ValueError("Expected `history` to hold at least one evaluation, but got none.")
    if x not in ("epoch", "step", None):
        raise ValueError(f"Expected `x` to be 'epoch', 'step' or None, but got {x!r}.")
    if x is None:
        epochs = [entry.get("epoch") for entry in history]
        x = "epoch" if None not in epochs and len(set(epochs)) == len(epochs) else "step"
    if any(x not in entry for entry in history):
        raise ValueError(f"Expected every evaluation in `history` to have {x!r}, but one has not.")
    xs = [entry[x] for entry in history]
    keys = {key: parsed for entry in history for key in entry if (parsed := _parse_key(key))}
    if layers is None:
        layers = list(dict.fromkeys(layer for layer, _, _ in keys.values() if layer))
    series: dict[str, dict[tuple[str, str | None], list[float]]] = {}
    for key, (layer, kind, score) in keys.items():
        if layer in layers or not layer:
            values = [float(entry.get(key, math.nan)) for entry in history]
            series.setdefault(score, {})[(layer, kind)] = values
    scores = sorted(series, key=_score_rank)
    columns = max(1, min(3, len(scores)))
    rows = max(1, math.ceil(len(scores) / columns))
    fig = Figure(figsize=(3.6 * columns, 2.5 * rows + 0.9), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    palette = matplotlib.colormaps["tab10" if len(layers) <= 10 else "tab20"]
    colours = {layer: palette(i % palette.N) for i, layer in enumerate(layers)}
    for ax, score in zip(axes, scores, strict=False):
        for (layer, kind), ys in series[score].items():
            ax.plot(
                xs,
                ys,
                _STYLES[kind],
                color=colours.get(layer, "black"),
                marker="o",
                markersize=3,
                linewidth=1.4,
                gid=f"{layer}/{kind or '-'}/{score}",
            )
        ax.set_title(_score_title(score), fontsize=9)
        if score == "time_s":
            ax.set_ylim(bottom=0.0)  # a duration reads against zero
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(scores) :]:
        ax.remove()
    handles = [Line2D([], [], color=colours[layer], label=layer) for layer in layers]
    kinds = {kind for lines in series.values() for _, kind in lines if kind is not None}
    handles += [
        Line2D([], [], color="grey", linestyle=_STYLES[kind], label=kind)
        for kind in _KINDS
        if kind in kinds
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 6),
            fontsize=8,
            frameon=False,
        )
    fig.suptitle("RSM scores over training", fontsize=11)
    return fig


# --- one evaluation ------------------------------------------------------------------------------


def evaluation_figures(
    rsms: Mapping[str, Mapping[str, Tensor]],
    labels: Tensor | None = None,
    *,
    epoch: int | None = None,
    step: int | None = None,
    previous_ranges: Mapping[str, tuple[float, float]] | None = None,
    heatmap_range: tuple[float, float] | None = None,
    kernel: str | None = None,
    layer_rsa: Tensor | None = None,
    method: str = "spearman",
    images: Tensor | None = None,
    k: int = 5,
) -> tuple[dict[str, Figure], dict[str, tuple[float, float]]]:
    """Every picture of one evaluation, by tag, and the colour ranges to hold for the next.

    Per layer a :func:`heatmap_figure` (tag ``rsm/<layer>/heatmap``) on ``heatmap_range`` if
    given, else on :func:`next_colour_range` of the layer's previous range; with ``images``
    a :func:`neighbours_figure` (``rsm/<layer>/neighbours``); with ``layer_rsa`` and more than
    one layer a :func:`rsa_figure` (``rsm/layer_rsa``).

    Args:
        rsms: ``{layer: {kind: (N, N) RSM}}``, layers in the order of ``layer_rsa``'s rows.
        labels: class ids ``(N,)``, multi-hot ``(N, L)`` or ``None``.
        epoch: shown in the titles when given.
        step: shown in the titles when given.
        previous_ranges: ``{layer: (vmin, vmax)}`` returned by the last evaluation; default
            none (each layer's range comes from its data).
        heatmap_range: a fixed ``(vmin, vmax)`` for every heatmap (then the ranges returned
            are this one).
        kernel: names the heatmaps' colour bars.
        layer_rsa: ``(L, L)`` RSA of the layers' semantic RSMs.
        method: the RSA method, for its title.
        images: the probe as images ``(N, 1 | 3, H, W)`` (:func:`as_images`), or ``None``.
        k: neighbours per query and RSM.

    Returns:
        ``({tag: Figure}, {layer: (vmin, vmax)})``.

    Example:
        >>> rsm = torch.tensor([[1.0, 0.2, 0.6], [0.2, 1.0, 0.4], [0.6, 0.4, 1.0]])
        >>> rsms = {"a": {"semantic": rsm, "baseline": rsm / 2}, "b": {"semantic": rsm}}
        >>> figures, ranges = evaluation_figures(rsms, layer_rsa=torch.eye(2), epoch=1)
        >>> sorted(figures)
        ['rsm/a/heatmap', 'rsm/b/heatmap', 'rsm/layer_rsa']
        >>> [round(value, 2) for value in ranges["a"]]        # both kinds on one scale
        [0.1, 0.6]
    """
    previous_ranges = {} if previous_ranges is None else previous_ranges
    figures: dict[str, Figure] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for layer, kinds in rsms.items():
        if heatmap_range is None:
            ranges[layer] = next_colour_range(previous_ranges.get(layer), list(kinds.values()))
        else:
            ranges[layer] = heatmap_range
        figures[f"rsm/{layer}/heatmap"] = heatmap_figure(
            kinds,
            labels,
            layer=layer,
            epoch=epoch,
            step=step,
            colour_range=ranges[layer],
            kernel=kernel,
        )
        if images is not None:
            figures[f"rsm/{layer}/neighbours"] = neighbours_figure(
                kinds, images, labels, k=k, layer=layer, epoch=epoch, step=step
            )
    if layer_rsa is not None and len(rsms) > 1:
        figures["rsm/layer_rsa"] = rsa_figure(
            layer_rsa, list(rsms), method=method, epoch=epoch, step=step
        )
    return figures, ranges


# --- rendering -----------------------------------------------------------------------------------


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render a figure (Agg, at its own dpi) to an RGB image, the form the image loggers take.

    Args:
        figure: a matplotlib ``Figure``.

    Returns:
        uint8 array of shape ``(H, W, 3)``, ``H, W`` the figure's size in inches times its dpi.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure_to_rgb(Figure(figsize=(2, 1), dpi=50)).shape
        (50, 100, 3)
    """
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def figure_to_png(figure: Figure) -> bytes:
    """Render a figure (Agg, at its own dpi) to PNG bytes.

    Args:
        figure: a matplotlib ``Figure``.

    Returns:
        the PNG file's bytes.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure_to_png(Figure(figsize=(1, 1)))[:4]
        b'\x89PNG'
    """
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
