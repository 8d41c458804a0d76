"""Retrieval scores of an RSM: hand-solved cases, a brute-force loop, torchmetrics, bad input."""

import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_precision as tm_precision
from torchmetrics.functional.retrieval import retrieval_recall as tm_recall
from torchmetrics.retrieval import RetrievalMAP

import lightning_rsm.functional.retrieval as retrieval_module
from lightning_rsm.functional import (
    retrieval_average_precision,
    retrieval_f1_at_1,
    retrieval_precision,
    retrieval_recall,
)

# Ranking for query 3 has a tie (0.2 for samples 0 and 2): the lower index, 0, comes first.
RSM = torch.tensor(
    [
        [1.0, 0.9, 0.1, 0.2],
        [0.9, 1.0, 0.3, 0.1],
        [0.1, 0.3, 1.0, 0.2],
        [0.2, 0.1, 0.2, 1.0],
    ]
)
NAN_RSM = RSM.clone().fill_diagonal_(torch.nan)


def _brute_force(rsm, labels, *, top_k=None, k=1, action="skip"):
    """Per-query Python loop: AP, precision@k, recall@k and F1@1, averaged as documented."""
    n = rsm.shape[0]
    multi = labels.ndim == 2
    sets = [set(torch.nonzero(row).flatten().tolist()) for row in labels] if multi else None

    def relevant(i, j):
        return bool(sets[i] & sets[j]) if multi else bool(labels[i] == labels[j])

    per_query = {"map": [], "precision": [], "recall": [], "f1": []}
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-float(rsm[i, j]), j))
        rel = [relevant(i, j) for j in others]
        n_rel = sum(rel)
        if n_rel == 0:
            if action == "skip":
                continue
            for values in per_query.values():
                values.append(float(action == "pos"))
            continue
        depth = len(others) if top_k is None else top_k
        precisions = [sum(rel[: r + 1]) / (r + 1) for r in range(depth) if rel[r]]
        denominator = n_rel if top_k is None else len(precisions)
        per_query["map"].append(sum(precisions) / denominator if precisions else 0.0)
        per_query["precision"].append(sum(rel[:k]) / k)
        per_query["recall"].append(sum(rel[:k]) / n_rel)
        if multi:
            a, b = sets[i], sets[others[0]]
            per_query["f1"].append(2 * len(a & b) / (len(a) + len(b)))
        else:
            per_query["f1"].append(float(rel[0]))
    return {key: sum(v) / len(v) if v else 0.0 for key, v in per_query.items()}


def _scores(rsm, labels, *, top_k=None, k=1, action="skip"):
    return {
        "map": retrieval_average_precision(rsm, labels, top_k, empty_target_action=action),
        "precision": retrieval_precision(rsm, labels, k, empty_target_action=action),
        "recall": retrieval_recall(rsm, labels, k, empty_target_action=action),
        "f1": retrieval_f1_at_1(rsm, labels, empty_target_action=action),
    }


def _random_rsm(n, *, decimals=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = (x + x.T) / 2
    return x.round(decimals=decimals) if decimals is not None else x


def test_hand_solved_class_ids():
    labels = torch.tensor([0, 0, 1, 1])
    # APs per query: 1, 1, 1/2 (0.3 beats 0.2), 1/2 (tie 0.2: sample 0 before sample 2)
    assert retrieval_average_precision(RSM, labels) == pytest.approx(0.75)
    assert retrieval_precision(RSM, labels, k=1) == pytest.approx(0.5)
    assert retrieval_precision(RSM, labels, k=2) == pytest.approx(0.5)
    assert retrieval_recall(RSM, labels, k=1) == pytest.approx(0.5)
    assert retrieval_recall(RSM, labels, k=3) == pytest.approx(1.0)
    assert retrieval_f1_at_1(RSM, labels) == pytest.approx(0.5)


def test_ties_broken_by_lower_index():
    rsm = torch.ones(3, 3)
    # All similarities tie: query 0 ranks (1, 2), query 1 ranks (0, 2), query 2 ranks (0, 1).
    labels = torch.tensor([0, 1, 0])
    # query 0: relevant 2 at rank 2 -> AP 1/2; query 1: none (skipped); query 2: 0 at rank 1.
    assert retrieval_average_precision(rsm, labels) == pytest.approx(0.75)
    assert retrieval_precision(rsm, labels, k=1) == pytest.approx(0.5)
    # The same ranking again on a transposed copy: ties are never broken by chance.
    assert retrieval_average_precision(rsm.T.contiguous(), labels) == pytest.approx(0.75)


def test_perfect_rsm_scores_one():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 1])
    rsm = (labels[:, None] == labels[None, :]).float() + 0.01 * torch.rand(7, 7)
    rsm = (rsm + rsm.T) / 2
    assert retrieval_average_precision(rsm, labels) == pytest.approx(1.0)
    assert retrieval_precision(rsm, labels, k=1) == pytest.approx(1.0)
    assert retrieval_recall(rsm, labels, k=2) == pytest.approx(1.0)


def test_multi_hot_hand_solved():
    rsm = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.3], [0.1, 0.3, 1.0]])
    labels = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 1, 1]])
    assert retrieval_f1_at_1(rsm, labels) == pytest.approx(2 / 3)
    # Every pair shares label 1, so everything is relevant.
    assert retrieval_average_precision(rsm, labels) == pytest.approx(1.0)
    disjoint = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    # queries 0 and 1 retrieve each other (F1 1); query 2 shares nothing and is skipped
    assert retrieval_f1_at_1(rsm, disjoint) == pytest.approx(1.0)
    assert retrieval_f1_at_1(rsm, disjoint, empty_target_action="neg") == pytest.approx(2 / 3)


@pytest.mark.parametrize("action", ["skip", "neg", "pos"])
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties
@pytest.mark.parametrize("top_k", [None, 5])
def test_class_ids_match_brute_force(action, decimals, top_k):
    rsm = _random_rsm(30, decimals=decimals, seed=1)
    labels = torch.randint(0, 8, (30,), generator=torch.Generator().manual_seed(2))
    labels[0] = 99  # a query with no relevant sample
    expected = _brute_force(rsm, labels, top_k=top_k, k=3, action=action)
    got = _scores(rsm, labels, top_k=top_k, k=3, action=action)
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key], abs=1e-12), key


@pytest.mark.parametrize("action", ["skip", "neg"])
@pytest.mark.parametrize("decimals", [None, 1])
def test_multi_hot_matches_brute_force(action, decimals):
    rsm = _random_rsm(25, decimals=decimals, seed=3)
    labels = torch.rand(25, 6, generator=torch.Generator().manual_seed(4)) < 0.25
    labels[3] = False  # no label at all: never relevant
    expected = _brute_force(rsm, labels, top_k=4, k=2, action=action)
    got = _scores(rsm, labels.float(), top_k=4, k=2, action=action)
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key], abs=1e-12), key


def test_blocks_give_the_same_result(monkeypatch):
    rsm = _random_rsm(23, decimals=1, seed=5)
    labels = torch.randint(0, 4, (23,), generator=torch.Generator().manual_seed(6))
    whole = _scores(rsm, labels, top_k=7, k=4)
    monkeypatch.setattr(retrieval_module, "_BLOCK_ELEMENTS", 23 * 5)  # blocks of 5 rows
    blocked = _scores(rsm, labels, top_k=7, k=4)
    for key in whole:
        torch.testing.assert_close(blocked[key], whole[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("action", ["skip", "neg", "pos"])
@pytest.mark.parametrize("top_k", [None, 6])
def test_map_matches_torchmetrics(action, top_k):
    n = 40
    rsm = _random_rsm(n, seed=7).float()  # no ties, all similarities > 0 (as torchmetrics needs)
    labels = torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(8))
    labels[5] = 42  # an empty query
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    indexes = torch.arange(n)[:, None].expand(n, n)[off_diagonal]
    target = (labels[:, None] == labels[None, :])[off_diagonal]
    reference = RetrievalMAP(empty_target_action=action, top_k=top_k)
    expected = reference(rsm[off_diagonal], target, indexes=indexes)
    got = retrieval_average_precision(rsm, labels, top_k, empty_target_action=action)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_precision_recall_match_torchmetrics(k):
    n = 30
    rsm = _random_rsm(n, seed=9).float()
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(10))
    precisions, recalls = [], []
    for i in range(n):
        others = torch.arange(n) != i
        target = labels[others] == labels[i]
        precisions.append(tm_precision(rsm[i, others], target, top_k=k))
        recalls.append(tm_recall(rsm[i, others], target, top_k=k))
    # with 30 samples and 5 classes every query has relevant samples: nothing to skip
    torch.testing.assert_close(retrieval_precision(rsm, labels, k), torch.stack(precisions).mean())
    torch.testing.assert_close(retrieval_recall(rsm, labels, k), torch.stack(recalls).mean())


def test_invariant_to_sample_order():
    rsm = _random_rsm(20, seed=11)
    labels = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(12))
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(13))
    before = _scores(rsm, labels, k=2)
    after = _scores(rsm[perm][:, perm], labels[perm], k=2)
    for key in before:
        torch.testing.assert_close(after[key], before[key])


def test_dtype_follows_rsm():
    labels = torch.tensor([0, 0, 1, 1])
    assert retrieval_average_precision(RSM, labels).dtype == torch.float32
    assert retrieval_average_precision(RSM.double(), labels).dtype == torch.float64


def test_all_queries_empty_warns_and_scores_zero():
    with pytest.warns(UserWarning, match="No query has a relevant sample"):
        score = retrieval_average_precision(RSM, torch.arange(4))
    assert score.item() == 0.0


def test_error_action_names_the_query():
    with pytest.raises(ValueError, match="query 2 shares no label"):
        retrieval_average_precision(RSM, torch.tensor([0, 0, 1, 3]), empty_target_action="error")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: retrieval_average_precision(RSM, torch.tensor([0, 1, 0])),
            ValueError,
            r"shape \(4,\).*but got shape \(3,\)",
        ),
        (
            lambda: retrieval_average_precision(RSM[:3], torch.tensor([0, 1, 0])),
            ValueError,
            r"square matrix.*but got shape \(3, 4\)",
        ),
        (
            lambda: retrieval_average_precision(torch.ones(1, 1), torch.tensor([0])),
            ValueError,
            "at least 2 samples",
        ),
        (
            lambda: retrieval_average_precision(RSM.numpy(), torch.tensor([0, 1, 0, 1])),
            TypeError,
            "to be a torch.Tensor, but got ndarray",
        ),
        (
            lambda: retrieval_average_precision(RSM.long(), torch.tensor([0, 1, 0, 1])),
            TypeError,
            "floating dtype",
        ),
        (
            lambda: retrieval_average_precision(NAN_RSM, torch.tensor([0, 1, 0, 1])),
            ValueError,
            "4 NaN/Inf values",
        ),
        (
            lambda: retrieval_average_precision(RSM, [0, 1, 0, 1]),
            TypeError,
            "`labels` to be a torch.Tensor",
        ),
        (
            lambda: retrieval_average_precision(RSM, torch.tensor([0.0, 1, 0, 1])),
            TypeError,
            "integer or bool dtype, but got torch.float32",
        ),
        (
            lambda: retrieval_average_precision(
                RSM, torch.tensor([[0, 2], [1, 0], [1, 0], [0, 1]])
            ),
            ValueError,
            "only 0 and 1, but got the value 2",
        ),
        (
            lambda: retrieval_average_precision(RSM, torch.zeros(4, 1, 1)),
            ValueError,
            r"but got shape \(4, 1, 1\)",
        ),
        (
            lambda: retrieval_precision(RSM, torch.tensor([0, 1, 0, 1]), k=4),
            ValueError,
            r"`k` to be an int in \[1, N - 1\] = \[1, 3\].*but got 4",
        ),
        (
            lambda: retrieval_precision(RSM, torch.tensor([0, 1, 0, 1]), k=0),
            ValueError,
            "but got 0",
        ),
        (
            lambda: retrieval_recall(RSM, torch.tensor([0, 1, 0, 1]), k=True),
            ValueError,
            "but got True",
        ),
        (
            lambda: retrieval_recall(RSM, torch.tensor([0, 1, 0, 1]), k=2.0),
            ValueError,
            "but got 2.0",
        ),
        (
            lambda: retrieval_average_precision(RSM, torch.tensor([0, 1, 0, 1]), top_k=9),
            ValueError,
            "`top_k` to be an int",
        ),
        (
            lambda: retrieval_f1_at_1(RSM, torch.tensor([0, 1, 0, 1]), empty_target_action="drop"),
            ValueError,
            r"one of \['error', 'neg', 'pos', 'skip'\], but got 'drop'",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
