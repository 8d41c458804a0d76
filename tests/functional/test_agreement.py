"""Probability agreement and Jensen-Shannon similarity against scipy; one-hot safety; bad input."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import jensenshannon

import lightning_rsm.functional.agreement as agreement_module
from lightning_rsm.functional import jensen_shannon_similarity, probability_agreement


def _probabilities(n, k, *, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, k, generator=g, dtype=torch.float64) ** 3
    p[p < 0.05] = 0  # zeros inside rows
    p[0] = 0
    p[0, 1] = 1  # a one-hot row
    p[1] = 0
    p[1, 2] = 1  # a different one-hot row
    p[2] = p[0]  # the same one-hot again
    return p / p.sum(1, keepdim=True)


def _scipy_similarity(p):
    n = p.shape[0]
    return np.array(
        [[1 - jensenshannon(p[i], p[j], base=2) ** 2 for j in range(n)] for i in range(n)]
    )


def test_similarity_matches_scipy_squared_distance():
    p = _probabilities(12, 5, seed=0)
    got = jensen_shannon_similarity(p, from_logits=False)
    np.testing.assert_allclose(got.numpy(), _scipy_similarity(p.numpy()), rtol=0, atol=1e-12)


def test_one_hot_rows_are_exact():
    p = _probabilities(4, 5, seed=1)
    s = jensen_shannon_similarity(p, from_logits=False)
    assert not s.isnan().any()
    assert s[0, 1].item() == 0.0  # disjoint supports: JSD = 1 bit
    assert s[0, 2].item() == 1.0  # identical
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)


def test_from_logits_is_softmax_first():
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        jensen_shannon_similarity(logits),
        jensen_shannon_similarity(torch.softmax(logits.double(), 1), from_logits=False).float(),
    )
    assert jensen_shannon_similarity(logits).dtype == torch.float32


def test_blocks_give_the_same_result(monkeypatch):
    p = _probabilities(11, 3, seed=3)
    whole = jensen_shannon_similarity(p, from_logits=False)
    monkeypatch.setattr(agreement_module, "_BLOCK_ELEMENTS", 11 * 3 * 2)  # 2 rows a block
    torch.testing.assert_close(jensen_shannon_similarity(p, from_logits=False), whole)


@pytest.mark.parametrize(
    ("correlation", "reference"),
    [("pearson", stats.pearsonr), ("spearman", stats.spearmanr)],
)
def test_agreement_matches_scipy(correlation, reference):
    logits = 3 * torch.randn(25, 6, generator=torch.Generator().manual_seed(4))
    noise = torch.rand(25, 25, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rsm = jensen_shannon_similarity(logits).double() + noise + noise.T
    p = torch.softmax(logits.double(), 1).numpy()
    rows, cols = np.triu_indices(25, k=1)
    expected = reference(rsm.numpy()[rows, cols], _scipy_similarity(p)[rows, cols]).statistic
    got = probability_agreement(rsm, logits, correlation=correlation)
    assert got.item() == pytest.approx(expected, abs=1e-10)
    assert got.dtype == torch.float64


def test_agreement_is_higher_is_better():
    p = _probabilities(10, 4, seed=6)
    s = jensen_shannon_similarity(p, from_logits=False)
    assert probability_agreement(s, p, from_logits=False).item() == pytest.approx(1.0)
    # an RSM ordering pairs like the divergence (a distance) scores -1
    assert probability_agreement(1 - s, p, from_logits=False).item() == pytest.approx(-1.0)
    # tau-a of a ranking with itself is 1 minus the share of tied pairs
    upper = s.numpy()[np.triu_indices(10, k=1)]
    pairs = len(upper) * (len(upper) - 1) / 2
    tied = sum(c * (c - 1) / 2 for c in np.unique(upper, return_counts=True)[1])
    kendall = probability_agreement(s, p, correlation="kendall", from_logits=False)
    assert tied > 0
    assert kendall.item() == pytest.approx(1 - tied / pairs)


@pytest.mark.parametrize(
    ("rsm", "logits", "kwargs", "error", "match"),
    [
        (
            torch.eye(3),
            torch.zeros(3, 2).index_fill_(1, torch.tensor([1]), torch.nan),
            {},
            ValueError,
            "`logits` to be finite, but got 3 NaN/Inf values",
        ),
        (
            torch.eye(3),
            torch.zeros(4, 2),
            {},
            ValueError,
            r"\(3, K\) to match the RSM of 3 samples, but got shape \(4, 2\)",
        ),
        (torch.eye(3), torch.zeros(3), {}, ValueError, r"but got shape \(3,\)"),
        (torch.eye(3), torch.zeros(3, 2, dtype=torch.long), {}, TypeError, "floating dtype"),
        (torch.eye(3), [[0.0]], {}, TypeError, "`logits` to be a torch.Tensor"),
        (
            torch.eye(3),
            torch.full((3, 2), 0.4),
            {"from_logits": False},
            ValueError,
            "sum to 1 along dim 1, but got 0.8 for row 0",
        ),
        (
            torch.eye(2),
            torch.tensor([[1.5, -0.5], [0.5, 0.5]]),
            {"from_logits": False},
            ValueError,
            "non-negative, but got the value -0.5",
        ),
        (
            torch.eye(3),
            torch.zeros(3, 2),
            {"from_logits": 1},
            TypeError,
            "`from_logits` to be a bool, but got int",
        ),
        (
            torch.eye(3),
            torch.zeros(3, 2),
            {"correlation": "cka"},
            ValueError,
            r"`correlation` to be one of \['kendall', 'pearson', 'spearman'\], but got 'cka'",
        ),
        (torch.ones(3, 2), torch.zeros(3, 2), {}, ValueError, "`rsm` to be a square matrix"),
    ],
)
def test_bad_input(rsm, logits, kwargs, error, match):
    with pytest.raises(error, match=match):
        probability_agreement(rsm, logits, **kwargs)


def test_similarity_bad_input():
    with pytest.raises(ValueError, match=r"`logits_or_probs` of shape \(N, K\)"):
        jensen_shannon_similarity(torch.zeros(2, 3, 4))
