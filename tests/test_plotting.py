"""Every RSM picture orders samples the same way: plotting.label_order."""

import matplotlib
import torch

from lightning_rsm.metrics import SemanticRSM
from lightning_rsm.plotting import label_order, rsm_images, sort_by_label

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
    images = rsm_images({"x": {"semantic": rsm}}, labels, {"x": (0.0, 1.0)})
    expected = rsm_images({"x": {"semantic": sort_by_label(rsm, labels)}}, None,
                          {"x": (0.0, 1.0)})  # fmt: skip
    assert (images["rsm/x/semantic/heatmap"] == expected["rsm/x/semantic/heatmap"]).all()
