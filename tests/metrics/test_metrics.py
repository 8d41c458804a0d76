"""Metrics: the shared metric checks against the functional API, DDP, options and plots.

The tests marked ``oldest`` also run on the oldest declared versions; the DDP ones here do not:
on torch 2.1 ``mp.spawn`` of tensor arguments fails. The Metrics meet DDP on those versions in
``test_metrics_in_lightning_module.py`` (Lightning's ``ddp_spawn``)."""

from functools import partial

import matplotlib
import pytest
import torch
from helpers.metric_tester import check_metric, check_metric_ddp
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
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS
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


BATCHES = (slice(0, 5), slice(5, 9), slice(9, N))


def _batches(*tensors):
    return [tuple(t[part] for t in tensors) for part in BATCHES]


def _rsm_and_scores(metric):
    """What SemanticRSM gives: its scores and, under ``"rsm"``, its RSM."""
    return {**metric.compute(), "rsm": metric.rsm()}


def _scores(features, labels=None, logits=None, **options):
    """The reference of SemanticRSM: the functional RSM and its scores, one by one."""
    rsm = semantic_rsm(features, kernel=options.get("kernel", "cosine"), max_positions=64)
    out = {"rsm": rsm}
    if labels is not None:
        out["map"] = retrieval_average_precision(rsm, labels, top_k=options.get("top_k"))
        for k in options.get("ks", (1,)):
            out[f"precision@{k}"] = retrieval_precision(rsm, labels, k=k)
            out[f"recall@{k}"] = retrieval_recall(rsm, labels, k=k)
        if labels.ndim == 2:
            out["f1@1"] = retrieval_f1_at_1(rsm, labels)
    if logits is not None:
        out["probability_agreement"] = probability_agreement(
            rsm, logits, correlation=options.get("correlation", "pearson")
        )
    return out


def _comparison(a, b, method="spearman"):
    return compare_rsms(semantic_rsm(a), semantic_rsm(b), method=method)


def _agreement(features, logits, matcher="exact"):
    return probability_agreement(semantic_rsm(features, matcher=matcher), logits)


@pytest.mark.oldest
def test_semantic_rsm_passes_the_metric_checks():
    features, labels, _, logits = _data()
    options = {"top_k": 2, "ks": (1, 2), "correlation": "spearman"}
    check_metric(
        partial(SemanticRSM, **options),
        _batches(features, labels, logits),
        partial(_scores, **options),
        _rsm_and_scores,
    )


@pytest.mark.oldest
def test_semantic_rsm_multi_hot_passes_the_metric_checks():
    features, _, multi_hot, _ = _data(1)
    check_metric(partial(SemanticRSM), _batches(features, multi_hot), _scores, _rsm_and_scores)


@pytest.mark.oldest
def test_rsm_comparison_passes_the_metric_checks():
    features, *_ = _data(4)
    check_metric(
        partial(RSMComparison, method="kendall"),
        _batches(features, features.square()),
        partial(_comparison, method="kendall"),
    )
    # rotating every map by 180 degrees permutes positions: the semantic RSM cannot tell
    rotated = RSMComparison(method="pearson")
    rotated.update(features, features.flip(2, 3))
    assert rotated.compute().item() == pytest.approx(1.0)


@pytest.mark.oldest
def test_probability_agreement_passes_the_metric_checks():
    features, _, _, logits = _data(5)
    check_metric(
        partial(ProbabilityAgreement, matcher="greedy"),
        _batches(features, logits),
        partial(_agreement, matcher="greedy"),
    )


@pytest.mark.oldest
def test_pooling_happens_on_update_with_the_shared_default():
    features = torch.randn(N, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    metric = SemanticRSM()
    metric.update(features)
    assert dim_zero_cat(metric.features).shape == (N, DEFAULT_MAX_POSITIONS, 4)
    unpooled = SemanticRSM(kernel="rbf", max_positions=None)
    unpooled.update(features[:4])
    torch.testing.assert_close(unpooled.rsm(), semantic_rsm(features[:4], kernel="rbf"))


@pytest.mark.oldest
def test_features_only_and_reset():
    features, *_ = _data(3)
    metric = SemanticRSM()
    metric.update(features)
    assert metric.compute() == {}
    assert metric.rsm().shape == (N, N)
    metric.reset()
    assert metric.features == []
    with (
        pytest.warns(UserWarning, match="called before the ``update``"),
        pytest.raises(ValueError, match="to have been called with `features`"),
    ):
        metric.compute()


@pytest.mark.oldest
def test_flags_and_states():
    metric = SemanticRSM()
    assert metric.full_state_update is False
    assert metric.higher_is_better is True
    for name in ("features", "labels", "logits", "ids"):
        assert metric._reductions[name] is dim_zero_cat
        assert metric._defaults[name] == []


@pytest.mark.oldest
def test_plot_sorts_samples_by_label():
    features, labels, *_ = _data(6)
    metric = SemanticRSM()
    metric.update(features, labels)
    out = metric.compute()
    fig, ax = metric.plot(out)
    order = torch.sort(labels, stable=True).indices
    drawn = torch.as_tensor(ax.images[0].get_array())
    torch.testing.assert_close(drawn, metric.rsm()[order][:, order])
    assert "mAP" in ax.get_title()
    boundaries = [c for c in ax.collections if c.get_gid() == "boundaries"]
    assert [len(c.get_segments()) for c in boundaries] == [len(labels.unique()) - 1] * 2
    plt.close(fig)
    series = [torch.tensor(0.2), torch.tensor(0.5), torch.tensor(0.7)]  # one value per epoch
    fig, ax = RSMComparison().plot(series)
    (line,) = ax.lines
    torch.testing.assert_close(torch.as_tensor(line.get_ydata()), torch.stack(series))
    plt.close(fig)


@pytest.mark.oldest
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


@pytest.mark.oldest
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


@pytest.mark.oldest
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


@pytest.mark.oldest
def test_k_larger_than_samples_fails_on_compute():
    features, labels, *_ = _data(9)
    metric = SemanticRSM(ks=(1, N))
    metric.update(features, labels)
    with pytest.raises(ValueError, match=rf"`k` to be an int in \[1, N - 1\] = \[1, {N - 1}\]"):
        metric.compute()


@pytest.mark.parametrize("empty_rank", [None, 1, 0])
def test_ddp_equals_single_process_also_with_a_rank_that_saw_no_data(tmp_path, empty_rank):
    features, _, multi_hot, logits = _data(10)
    shards = [_batches(features, multi_hot, logits)[:2], _batches(features, multi_hot, logits)[2:]]
    if empty_rank is not None:
        shards = [shards[0] + shards[1], []] if empty_rank == 1 else [[], shards[0] + shards[1]]
    options = {"ks": (2,), "correlation": "spearman"}
    check_metric_ddp(
        partial(SemanticRSM, **options),
        shards,
        partial(_scores, **options),
        tmp_path,
        _rsm_and_scores,
    )


def test_ddp_comparison_and_agreement_with_uneven_shards(tmp_path):
    features, _, _, logits = _data(11)
    batches = _batches(features, features.exp())
    check_metric_ddp(
        partial(RSMComparison, method="cka"),
        [batches[:1], batches[1:]],
        partial(_comparison, method="cka"),
        tmp_path / "comparison",
    )
    batches = _batches(features, logits)
    check_metric_ddp(partial(ProbabilityAgreement), [[], batches], _agreement, tmp_path / "agree")


@pytest.mark.oldest
def test_auction_tolerance_reaches_the_rsm():
    x = torch.rand(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    metric = SemanticRSM(matcher="auction", tol=0.3)
    metric.update(x)
    expected = semantic_rsm(x, matcher="auction", tol=0.3)
    assert torch.equal(metric.rsm(), expected)
    assert not torch.equal(expected, semantic_rsm(x, matcher="auction", tol=1e-6))
    with pytest.raises(ValueError, match="`tol`"):
        SemanticRSM(matcher="auction", tol=-1.0)


@pytest.mark.oldest
def test_ids_drop_repeated_samples_and_order_rows_by_id():
    features, labels, _, logits = _data(12)
    ids = torch.arange(N).flip(0)  # sample i has id N - 1 - i
    metric = SemanticRSM()
    metric.update(features[:8], labels[:8], logits[:8], ids=ids[:8])
    metric.update(features[6:], labels[6:], logits[6:], ids=ids[6:])  # 6 and 7 again
    by_id = torch.arange(N - 1, -1, -1)  # the rows in ascending id
    expected = _scores(features[by_id], labels[by_id], logits[by_id])
    torch.testing.assert_close(_rsm_and_scores(metric), expected)
    with pytest.raises(TypeError, match="`ids` to have an integer dtype, but got torch.float32"):
        metric.update(features[:2], labels[:2], logits[:2], ids=torch.zeros(2))
    with pytest.raises(ValueError, match=r"`ids` of shape \(2,\) to match the 2 samples"):
        metric.update(features[:2], labels[:2], logits[:2], ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="update 3 is without `ids` and the earlier"):
        metric.update(features[:2], labels[:2], logits[:2])
