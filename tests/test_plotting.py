"""The pictures: sample order, colour scales, heatmaps, RSA, neighbours, trajectories."""

import matplotlib
import numpy as np
import pytest
import torch

from lightning_rsm.metrics import SemanticRSM
from lightning_rsm.plotting import (
    as_images,
    data_colour_range,
    evaluation_figures,
    figure_to_png,
    figure_to_rgb,
    heatmap_figure,
    history_figure,
    label_order,
    nearest_neighbours,
    neighbours_figure,
    next_colour_range,
    query_indices,
    rsa_figure,
    sort_by_label,
)
from lightning_rsm.run_comparison import RunComparison, comparison_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def test_label_order_puts_unlabelled_multi_hot_rows_last():
    labels = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1]])
    assert label_order(labels).tolist() == [2, 1, 4, 0, 3]
    assert label_order(torch.tensor([2, 0, 1, 0])).tolist() == [1, 3, 2, 0]


def test_heatmaps_and_the_metric_plot_order_samples_alike():
    g = torch.Generator().manual_seed(0)
    features = torch.rand(6, 3, 2, 2, generator=g)
    labels = torch.tensor([[0, 0], [0, 1], [1, 0], [0, 0], [1, 1], [0, 1]])
    metric = SemanticRSM()
    metric.update(features, labels)
    rsm = metric.rsm()
    fig, ax = metric.plot(metric.compute())
    drawn = torch.as_tensor(ax.images[0].get_array())
    plt.close(fig)
    torch.testing.assert_close(drawn, sort_by_label(rsm, labels))
    # the callback's pictures sort with the same function
    figures, _ = evaluation_figures({"x": {"semantic": rsm}}, labels)
    drawn = torch.as_tensor(figures["rsm/x/heatmap"].axes[0].images[0].get_array())
    torch.testing.assert_close(drawn, sort_by_label(rsm, labels))


def _classes_rsm(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A cosine RSM with class structure: unit vectors near one direction per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels.max()) + 1, 16, generator=g)
    z = torch.nn.functional.normalize(
        centres[labels] + 0.8 * torch.randn(len(labels), 16, generator=g), dim=1
    )
    return z @ z.T


def _saturated(rsm: torch.Tensor) -> torch.Tensor:
    """The same structure squeezed into cosine values 0.995-1.0, as a small ViT gives."""
    return 1.0 - (1.0 - rsm.clamp(min=0.0)) * 0.005


LABELS = torch.tensor([3, 0, 1, 3, 0, 1, 1, 0, 3, 3, 0, 1])


def test_a_saturated_rsm_is_drawn_on_its_own_range_with_a_colour_bar():
    rsm = _saturated(_classes_rsm(LABELS))
    off = rsm[~torch.eye(len(LABELS), dtype=torch.bool)]
    assert off.min() > 0.994
    fig = heatmap_figure({"semantic": rsm, "baseline": rsm - 0.001}, LABELS, kernel="cosine")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert images[0].get_clim() == images[1].get_clim()  # one shared scale
    vmin, vmax = images[0].get_clim()
    assert off.min() - 0.001 <= vmin < vmax <= off.max()  # not (0, 1): the data's own range
    assert vmax - vmin < 0.01
    bars = [image.colorbar for image in images if image.colorbar is not None]
    assert len(bars) == 1  # one colour bar for both panels
    assert bars[0].ax.get_ylabel() == "cosine similarity"
    below = bool((rsm - 0.001).min() < vmin)  # the diagonal (1.0) lies above the scale
    assert bars[0].extend == ("both" if below else "max")
    # an explicit range still fixes the scale
    fixed = heatmap_figure({"semantic": rsm}, LABELS, colour_range=(0.0, 1.0))
    assert fixed.axes[0].images[0].get_clim() == (0.0, 1.0)


def test_heatmap_ticks_are_the_class_ids_with_boundaries_and_a_titled_layer():
    rsm = _classes_rsm(LABELS)
    fig = heatmap_figure({"semantic": rsm}, LABELS, layer="blocks.3", epoch=4, step=120)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "3"]
    assert ax.get_xticks().tolist() == [1.5, 5.5, 9.5]  # the centres of blocks of 4
    boundaries = [c for c in ax.collections if c.get_gid() == "boundaries"]
    lines = [segment.tolist() for c in boundaries for segment in c.get_segments()]
    assert lines == [
        [[-0.5, 3.5], [11.5, 3.5]],
        [[-0.5, 7.5], [11.5, 7.5]],  # rows
        [[3.5, -0.5], [3.5, 11.5]],
        [[7.5, -0.5], [7.5, 11.5]],
    ]
    assert fig.get_suptitle() == "blocks.3: epoch 4, step 120"
    assert torch.equal(torch.as_tensor(ax.images[0].get_array()), sort_by_label(rsm, LABELS))


def test_multi_label_heatmaps_are_sorted_without_class_ticks():
    multi_hot = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0], [0, 1]])
    rsm = _classes_rsm(torch.tensor([1, 0, 0, 2, 1]))
    ax = heatmap_figure({"semantic": rsm}, multi_hot).axes[0]
    assert ax.get_xticks().tolist() == [] and len(ax.collections) == 0
    assert torch.equal(torch.as_tensor(ax.images[0].get_array()), sort_by_label(rsm, multi_hot))


def test_rsa_cells_hold_the_values_and_the_axes_the_layer_names():
    rsa = torch.tensor([[1.0, 0.25, -0.5], [0.25, 1.0, 0.125], [-0.5, 0.125, 1.0]])
    layers = ["conv1", "layer2.0", "head"]
    fig = rsa_figure(rsa, layers, method="kendall", epoch=2)
    ax = fig.axes[0]
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    assert cells == {(i, j): f"{float(rsa[i, j]):.2f}" for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == layers
    assert [t.get_text() for t in ax.get_yticklabels()] == layers
    assert "kendall" in ax.get_title() and "epoch 2" in ax.get_title()
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    assert rsa_figure(rsa.abs(), layers, method="cka").axes[0].images[0].get_clim() == (0.0, 1.0)


@pytest.mark.parametrize("method, clim", [("cka", (0.0, 1.0)), ("pearson", (-1.0, 1.0))])
def test_two_runs_are_drawn_on_their_methods_range_like_one_run(method, clim):
    # CKA lies in [0, 1]: on [-1, 1] half the colour bar would never be used
    result = RunComparison(
        torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.8, 0.05]]),
        ["a", "b"],
        ["x", "y", "z"],
        method,
        "semantic",
        3,
        5,
    )
    fig = comparison_figure(result, "seed0", "seed1")
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == clim
    assert ax.images[0].get_cmap().name == ("viridis" if method == "cka" else "RdBu_r")
    assert [t.get_text() for t in ax.texts] == ["0.90", "0.30", "0.10", "0.20", "0.80", "0.05"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]


def test_neighbours_are_the_top_k_others_and_their_frames_mark_the_class():
    rsm = _classes_rsm(LABELS, seed=1)
    baseline = _classes_rsm(LABELS, seed=2)
    images = torch.rand(len(LABELS), 3, 6, 6)
    fig = neighbours_figure({"semantic": rsm, "baseline": baseline}, images, LABELS, k=3)
    ax = fig.axes[0]
    frames = {patch.get_gid(): patch for patch in ax.patches}
    captions = {text.get_gid(): text.get_text() for text in ax.texts if text.get_gid()}
    queries = query_indices(LABELS, len(LABELS))
    assert queries == [1, 2, 0]  # the first sample of classes 0, 1 and 3
    assert len(frames) == len(queries) * (1 + 2 * 3)
    for kind, matrix in (("semantic", rsm), ("baseline", baseline)):
        for q in queries:
            others = sorted((j for j in range(len(LABELS)) if j != q), key=lambda j: -matrix[q, j])
            for rank, j in enumerate(others[:3]):
                gid = f"{kind}/{q}/{rank}"
                score, label = captions[gid].split()
                assert label == f"y={int(LABELS[j])}"
                assert float(score) == pytest.approx(float(matrix[q, j]), abs=0.01)
                colour = matplotlib.colors.to_hex(frames[gid].get_edgecolor())
                assert colour == ("#1a9e3a" if LABELS[j] == LABELS[q] else "#d62728")
    assert "green" in fig.get_suptitle()


def test_neighbours_of_a_multi_hot_probe_are_right_when_they_share_a_label():
    multi_hot = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]])
    rsm = torch.tensor(
        [[1.0, 0.1, 0.9, 0.5], [0.1, 1.0, 0.2, 0.8], [0.9, 0.2, 1.0, 0.3], [0.5, 0.8, 0.3, 1.0]]
    )
    fig = neighbours_figure(
        {"semantic": rsm}, torch.rand(4, 1, 5, 5), multi_hot, queries=[0, 3], k=2
    )
    marks = {p.get_gid(): matplotlib.colors.to_hex(p.get_edgecolor()) for p in fig.axes[0].patches}
    # query 0 {0}: sample 2 {2} (0.9) wrong, sample 3 {1, 2} (0.5) wrong
    # query 3 {1, 2}: sample 1 {0, 1} (0.8) right, sample 0 {0} (0.5) wrong
    assert marks["semantic/0/0"] == "#d62728" and marks["semantic/0/1"] == "#d62728"
    assert marks["semantic/3/0"] == "#1a9e3a" and marks["semantic/3/1"] == "#d62728"


def test_nearest_neighbours_exclude_the_query_and_break_ties_by_index():
    rsm = torch.tensor(
        [[1.0, 0.5, 0.5, 0.9], [0.5, 1.0, 0.2, 0.2], [0.5, 0.2, 1.0, 0.2], [0.9, 0.2, 0.2, 1.0]]
    )
    indices, scores = nearest_neighbours(rsm, [0, 1], 3)
    assert indices.tolist() == [[3, 1, 2], [0, 2, 3]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.5, 0.5], [0.5, 0.2, 0.2]]))
    with pytest.raises(ValueError, match="`k`"):
        nearest_neighbours(rsm, [0], 4)


def test_queries_are_fixed_one_per_class_and_spread_over_many_classes():
    labels = torch.arange(20).repeat(3)  # 20 classes, first members 0 .. 19
    assert query_indices(labels, 60) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert query_indices(labels, 60) == query_indices(labels.clone(), 60)
    multi_hot = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert query_indices(multi_hot, 4) == [0, 3, 2]  # label 1's first sample, 0, is taken
    assert query_indices(None, 5, max_queries=8) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="`max_queries`"):
        query_indices(labels, 60, max_queries=0)


def test_only_image_shaped_inputs_are_drawable():
    assert as_images(torch.rand(4, 3, 8, 8)).shape == (4, 3, 8, 8)
    assert as_images(torch.rand(4, 2, 8, 8)) is None  # two channels: not an image
    assert as_images({"pixel_values": torch.rand(4, 3, 8, 8)}) is None
    pixels = as_images({"pixel_values": torch.rand(4, 3, 8, 8)}, lambda b: b["pixel_values"])
    assert pixels.shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="`image_fn`"):
        as_images(torch.rand(4, 65, 32), lambda x: x)


def test_trajectories_draw_every_score_of_the_history():
    history = [
        {
            "epoch": 0,
            "step": 10,
            "rsm/a/semantic/map": 0.2,
            "rsm/a/baseline/map": 0.1,
            "rsm/b.0/semantic/map": 0.3,
            "rsm/time_s": 1.5,
        },
        {
            "epoch": 1,
            "step": 20,
            "rsm/a/semantic/map": 0.4,
            "rsm/a/baseline/map": 0.15,
            "rsm/b.0/semantic/map": 0.5,
            "rsm/a/rsa_to_previous": 0.9,
            "rsm/time_s": 1.0,
        },
    ]
    fig = history_figure(history)
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.lines}
    assert sorted(lines) == [
        "/-/time_s",
        "a/-/rsa_to_previous",
        "a/baseline/map",
        "a/semantic/map",
        "b.0/semantic/map",
    ]
    for gid, line in lines.items():
        layer, kind, score = gid.split("/")
        key = "/".join(p for p in ("rsm", layer, None if kind == "-" else kind, score) if p)
        expected = [entry.get(key, float("nan")) for entry in history]
        np.testing.assert_array_equal(line.get_ydata(), expected)
        assert line.get_xdata().tolist() == [0, 1]  # one evaluation per epoch: epochs
    assert lines["a/semantic/map"].get_color() == lines["a/baseline/map"].get_color()
    assert lines["a/semantic/map"].get_linestyle() == "-"
    assert lines["a/baseline/map"].get_linestyle() == "--"
    assert [ax.get_title() for ax in fig.axes] == [
        "mAP",
        "RSA to the previous evaluation",
        "evaluation time (s)",
    ]
    # two evaluations in one epoch: steps
    same_epoch = [dict(entry, epoch=0) for entry in history]
    assert history_figure(same_epoch).axes[0].lines[0].get_xdata().tolist() == [10, 20]


def test_the_colour_scale_is_kept_across_evaluations_until_it_would_blank_the_picture():
    rsm = _classes_rsm(LABELS)
    first = next_colour_range(None, [rsm])
    assert first == data_colour_range([rsm])
    drifted = rsm * 0.95  # a little change: same colours mean the same values
    assert next_colour_range(first, [drifted]) == first
    saturated = _saturated(rsm)  # a new range inside one colour of the old: re-derived
    assert next_colour_range(first, [saturated]) == data_colour_range([saturated])
    wider = rsm * 3.0  # data far beyond the old range would be clipped: re-derived
    assert next_colour_range(first, [wider]) == data_colour_range([wider])
    with pytest.raises(ValueError, match="`min_overlap`"):
        next_colour_range(first, [rsm], min_overlap=0.0)


def test_figures_render_to_images_without_pyplot_state():
    before = plt.get_fignums()
    fig = heatmap_figure({"semantic": _classes_rsm(LABELS)}, LABELS)
    image = figure_to_rgb(fig)
    width, height = fig.get_size_inches() * fig.dpi
    assert image.shape == (round(height), round(width), 3) and image.dtype == np.uint8
    assert figure_to_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == before


def test_one_evaluation_draws_every_picture_and_holds_each_layers_range():
    rsm = _classes_rsm(LABELS)
    rsms = {"conv": {"semantic": rsm, "baseline": rsm * 0.9}, "fc": {"semantic": rsm**2}}
    images = torch.rand(len(LABELS), 1, 6, 6)
    figures, ranges = evaluation_figures(
        rsms, LABELS, epoch=1, step=7, layer_rsa=torch.eye(2), images=images, k=2
    )
    assert sorted(figures) == [
        "rsm/conv/heatmap",
        "rsm/conv/neighbours",
        "rsm/fc/heatmap",
        "rsm/fc/neighbours",
        "rsm/layer_rsa",
    ]
    assert ranges["conv"] == data_colour_range([rsm, rsm * 0.9])
    assert figures["rsm/conv/heatmap"].axes[0].images[0].get_clim() == ranges["conv"]
    assert "epoch 1, step 7" in figures["rsm/fc/heatmap"].get_suptitle()
    # the next evaluation: a near RSM keeps the held range, a saturated one gets its own
    later = {"conv": {"semantic": rsm * 0.95}, "fc": {"semantic": _saturated(rsm)}}
    figures, next_ranges = evaluation_figures(later, LABELS, previous_ranges=ranges)
    assert sorted(figures) == ["rsm/conv/heatmap", "rsm/fc/heatmap"]  # no images, no layer_rsa
    assert next_ranges == {"conv": ranges["conv"], "fc": data_colour_range([_saturated(rsm)])}
    _, fixed = evaluation_figures(later, LABELS, previous_ranges=ranges, heatmap_range=(0.0, 1.0))
    assert fixed == {"conv": (0.0, 1.0), "fc": (0.0, 1.0)}


_RSM = torch.eye(3) + 0.1
_IMAGES = torch.rand(3, 1, 4, 4)


@pytest.mark.parametrize(
    ("draw", "match"),
    [
        (lambda: data_colour_range([]), "at least one"),
        (lambda: data_colour_range([_RSM], percentiles=(50.0, 10.0)), "`percentiles`"),
        (lambda: data_colour_range([torch.full((2, 2), float("nan"))]), "finite"),
        (lambda: data_colour_range([torch.ones(3)]), "2D"),
        (lambda: next_colour_range((1.0, 0.0), [_RSM]), "`previous`"),
        (lambda: heatmap_figure({}), "at least one kind"),
        (lambda: heatmap_figure({"a": _RSM, "b": torch.eye(4)}), "one shape"),
        (lambda: heatmap_figure({"a": _RSM}, colour_range=(1.0, 1.0)), "`colour_range`"),
        (lambda: heatmap_figure({"a": torch.ones(3, 4)}), r"\(N, N\)"),
        (lambda: heatmap_figure({"a": _RSM}, torch.tensor([0, 1])), "`labels`"),
        (lambda: rsa_figure(torch.ones(2, 3), ["a", "b"]), r"\(L, L\)"),
        (lambda: rsa_figure(torch.eye(2), ["a"]), "`layers`"),
        (lambda: query_indices(torch.tensor([0, 1]), 3), "`labels`"),
        (lambda: query_indices(None, 0), "`n`"),
        (lambda: nearest_neighbours(torch.ones(2, 3), [0], 1), r"\(N, N\)"),
        (lambda: nearest_neighbours(_RSM, [3], 1), "`queries`"),
        (lambda: neighbours_figure({}, _IMAGES), "at least one kind"),
        (lambda: neighbours_figure({"a": _RSM}, torch.rand(4, 1, 4, 4)), "`images`"),
        (lambda: neighbours_figure({"a": _RSM}, torch.rand(3, 8)), "`images`"),
        (lambda: history_figure([]), "at least one"),
        (lambda: history_figure([{"epoch": 0}], x="time"), "`x`"),
        (lambda: history_figure([{"epoch": 0}], x="step"), "'step'"),
    ],
)
def test_bad_inputs_fail_with_a_message_naming_them(draw, match):
    with pytest.raises(ValueError, match=match):
        draw()
