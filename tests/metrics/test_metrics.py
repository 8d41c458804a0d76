"""Metrics: batch accumulation equals the functional result, DDP equals one process, plots."""

import socket

import matplotlib
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.utilities.data import dim_zero_cat

from lightning_rsm.functional import (
    compare_rsms,
    probability_agreement,
    retrieval_average_precision,
    retrieval_f1_at_1,
    retrieval_precision,
    retrieval_recall,
    semantic_rsm,
)
from lightning_rsm.metrics import ProbabilityAgreement, RSMComparison, SemanticRSM

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

N = 12


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(N, 4, 3, 3, generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    multi_hot = torch.rand(N, 5, generator=g) < 0.3
    logits = torch.randn(N, 6, generator=g)
    return features, labels, multi_hot, logits


def _update_in_batches(metric, *tensors, sizes=(5, 4, 3)):
    start = 0
    for size in sizes:
        metric.update(*(t[start : start + size] for t in tensors))
        start += size


def test_semantic_rsm_equals_functional():
    features, labels, _, logits = _data()
    metric = SemanticRSM(top_k=5, ks=(1, 3), correlation="spearman")
    _update_in_batches(metric, features, labels, logits)
    out = metric.compute()
    rsm = semantic_rsm(features)
    torch.testing.assert_close(out["rsm"], rsm)
    assert set(out) == {"rsm", "map", "precision@1", "recall@1", "precision@3", "recall@3",
                        "probability_agreement"}  # fmt: skip
    torch.testing.assert_close(out["map"], retrieval_average_precision(rsm, labels, top_k=5))
    torch.testing.assert_close(out["precision@3"], retrieval_precision(rsm, labels, k=3))
    torch.testing.assert_close(out["recall@3"], retrieval_recall(rsm, labels, k=3))
    torch.testing.assert_close(out["recall@1"], retrieval_recall(rsm, labels, k=1))
    expected = probability_agreement(rsm, logits, correlation="spearman")
    torch.testing.assert_close(out["probability_agreement"], expected)


def test_semantic_rsm_multi_hot_and_pooling():
    features, _, multi_hot, _ = _data(1)
    features = torch.randn(N, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    metric = SemanticRSM(kernel="rbf", max_positions=9, empty_target_action="neg")
    _update_in_batches(metric, features, multi_hot)
    out = metric.compute()
    rsm = semantic_rsm(features, kernel="rbf", max_positions=9)
    torch.testing.assert_close(out["rsm"], rsm)
    assert set(out) == {"rsm", "map", "precision@1", "recall@1", "f1@1"}
    expected = retrieval_f1_at_1(rsm, multi_hot, empty_target_action="neg")
    torch.testing.assert_close(out["f1@1"], expected)
    # pooling happens on update: only 9 concept vectors per sample are kept
    assert dim_zero_cat(metric.features).shape == (N, 9, 4)


def test_features_only_and_reset():
    features, *_ = _data(3)
    metric = SemanticRSM()
    metric.update(features)
    assert set(metric.compute()) == {"rsm"}
    metric.reset()
    assert metric.features == []
    with (
        pytest.warns(UserWarning, match="called before the ``update``"),
        pytest.raises(ValueError, match="to have been called with `features`"),
    ):
        metric.compute()


def test_flags_and_states():
    metric = SemanticRSM()
    assert metric.full_state_update is False
    assert metric.higher_is_better is True
    for name in ("features", "labels", "logits"):
        assert metric._reductions[name] is dim_zero_cat
        assert metric._defaults[name] == []


def test_rsm_comparison_equals_functional():
    features, *_ = _data(4)
    other = features.square()
    metric = RSMComparison(method="kendall")
    _update_in_batches(metric, features, other)
    expected = compare_rsms(semantic_rsm(features), semantic_rsm(other), method="kendall")
    torch.testing.assert_close(metric.compute(), expected)
    # rotating every map by 180 degrees permutes positions: the semantic RSM cannot tell
    rotated = RSMComparison(method="pearson")
    rotated.update(features, features.flip(2, 3))
    assert rotated.compute().item() == pytest.approx(1.0)


def test_probability_agreement_equals_functional():
    features, _, _, logits = _data(5)
    metric = ProbabilityAgreement(correlation="pearson", matcher="greedy")
    _update_in_batches(metric, features, logits)
    expected = probability_agreement(semantic_rsm(features, matcher="greedy"), logits)
    torch.testing.assert_close(metric.compute(), expected)


def test_plot_sorts_samples_by_label():
    features, labels, *_ = _data(6)
    metric = SemanticRSM()
    metric.update(features, labels)
    out = metric.compute()
    fig, ax = metric.plot(out)
    order = torch.sort(labels, stable=True).indices
    drawn = torch.as_tensor(ax.images[0].get_array())
    torch.testing.assert_close(drawn, out["rsm"][order][:, order])
    assert "mAP" in ax.get_title()
    assert len(ax.lines) == 2 * (len(labels.unique()) - 1)  # class boundaries, both axes
    plt.close(fig)
    fig, ax = RSMComparison().plot(torch.tensor([0.2, 0.5, 0.7]))
    plt.close(fig)


def test_multi_hot_plot_order():
    features, _, multi_hot, _ = _data(7)
    metric = SemanticRSM()
    metric.update(features, multi_hot)
    fig, ax = metric.plot()
    first = torch.where(multi_hot.any(1), multi_hot.int().argmax(1), multi_hot.shape[1])
    order = torch.sort(first, stable=True).indices
    drawn = torch.as_tensor(ax.images[0].get_array())
    torch.testing.assert_close(drawn, semantic_rsm(features)[order][:, order])
    plt.close(fig)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel": "l2"}, ValueError, "`kernel` to be one of"),
        ({"matcher": "hungarian"}, ValueError, "`matcher` to be one of"),
        ({"top_k": 0}, ValueError, "`top_k` to be a positive int or None, but got 0"),
        ({"ks": ()}, ValueError, r"`ks` to be a non-empty sequence.*but got \(\)"),
        ({"ks": (1, 2.0)}, ValueError, "`ks`"),
        ({"correlation": "cka"}, ValueError, "`correlation` to be one of"),
        ({"from_logits": "yes"}, TypeError, "`from_logits` to be a bool, but got str"),
        ({"empty_target_action": "drop"}, ValueError, "`empty_target_action` to be one of"),
        ({"max_positions": -1}, ValueError, "`max_positions` to be a positive int"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        SemanticRSM(**kwargs)


def test_bad_updates():
    features, labels, multi_hot, logits = _data(8)
    metric = SemanticRSM()
    with pytest.raises(ValueError, match=r"\(4,\) \(class ids\).*the 4 samples of `features`"):
        metric.update(features[:4], labels[:3])
    with pytest.raises(ValueError, match="`logits` to be finite"):
        metric.update(features[:2], labels[:2], torch.full((2, 6), torch.nan))
    metric.update(features[:4], labels[:4])
    with pytest.raises(ValueError, match="update 2 is without `labels` and the earlier"):
        metric.update(features[4:6])
    with pytest.raises(ValueError, match="update 2 is with `logits` and the earlier"):
        metric.update(features[4:6], labels[4:6], logits[4:6])
    with pytest.raises(ValueError, match=r"`labels` of shape \(B,\) like the earlier"):
        metric.update(features[4:6], multi_hot[4:6])
    with pytest.raises(ValueError, match=r"\(B, 9, 4\) like the earlier updates"):
        metric.update(torch.randn(2, 4, 2, 2), labels[4:6])
    with pytest.raises(ValueError, match="same number of samples, but got 3 and 2"):
        RSMComparison().update(features[:3], features[:2])
    with pytest.raises(ValueError, match=r"`logits` of shape \(3, K\)"):
        ProbabilityAgreement().update(features[:3], logits[:2])


def test_k_larger_than_samples_fails_on_compute():
    features, labels, *_ = _data(9)
    metric = SemanticRSM(ks=(1, N))
    metric.update(features, labels)
    with pytest.raises(ValueError, match=rf"`k` to be an int in \[1, N - 1\] = \[1, {N - 1}\]"):
        metric.compute()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        features, _, multi_hot, logits = _data(10)
        # uneven shards, updated in batches: rank 0 holds samples 0..6, rank 1 samples 7..11
        shard = slice(0, 7) if rank == 0 else slice(7, N)
        sizes = (4, 3) if rank == 0 else (2, 3)
        metrics = {
            "semantic": SemanticRSM(ks=(2,), correlation="spearman"),
            "comparison": RSMComparison(method="cka"),
            "agreement": ProbabilityAgreement(),
        }
        _update_in_batches(
            metrics["semantic"], features[shard], multi_hot[shard], logits[shard], sizes=sizes
        )
        _update_in_batches(
            metrics["comparison"], features[shard], features[shard].exp(), sizes=sizes
        )
        _update_in_batches(metrics["agreement"], features[shard], logits[shard], sizes=sizes)
        results = {name: metric.compute() for name, metric in metrics.items()}
        torch.save(results, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    features, _, multi_hot, logits = _data(10)
    single = {
        "semantic": SemanticRSM(ks=(2,), correlation="spearman"),
        "comparison": RSMComparison(method="cka"),
        "agreement": ProbabilityAgreement(),
    }
    single["semantic"].update(features, multi_hot, logits)
    single["comparison"].update(features, features.exp())
    single["agreement"].update(features, logits)
    expected = {name: metric.compute() for name, metric in single.items()}
    assert set(expected["semantic"]) == {"rsm", "map", "precision@2", "recall@2", "f1@1",
                                         "probability_agreement"}  # fmt: skip
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, expected)


def test_auction_tolerance_reaches_the_rsm():
    x = torch.rand(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    metric = SemanticRSM(matcher="auction", tol=0.3)
    metric.update(x)
    expected = semantic_rsm(x, matcher="auction", tol=0.3)
    assert torch.equal(metric.compute()["rsm"], expected)
    assert not torch.equal(expected, semantic_rsm(x, matcher="auction", tol=1e-6))
    with pytest.raises(ValueError, match="`tol`"):
        SemanticRSM(matcher="auction", tol=-1.0)
