"""RSM comparison: correlations against scipy and brute force, CKA properties, bad input."""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from lightning_rsm.functional import compare_rsms
from lightning_rsm.functional.comparison import _count_inversions


def _symmetric(n, *, seed, decimals=None):
    x = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (x + x.T) / 2
    x.fill_diagonal_(1)
    return x.round(decimals=decimals) if decimals is not None else x


def _upper(x):
    rows, cols = np.triu_indices(x.shape[0], k=1)
    return x.numpy()[rows, cols]


def _tau_a_brute_force(x, y):
    total = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        total += np.sign(x[i] - x[j]) * np.sign(y[i] - y[j])
    return total / (len(x) * (len(x) - 1) / 2)


def _tau_a_from_scipy(x, y):
    """scipy gives tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)); undo the tie correction."""
    n0 = len(x) * (len(x) - 1) / 2
    n1 = sum(c * (c - 1) / 2 for c in np.unique(x, return_counts=True)[1])
    n2 = sum(c * (c - 1) / 2 for c in np.unique(y, return_counts=True)[1])
    tau_b = stats.kendalltau(x, y, variant="b").statistic
    return tau_b * np.sqrt((n0 - n1) * (n0 - n2)) / n0


@pytest.mark.parametrize("decimals", [None, 1])
def test_pearson_and_spearman_match_scipy(decimals):
    a, b = _symmetric(30, seed=0, decimals=decimals), _symmetric(30, seed=1, decimals=decimals)
    b = b + 0.5 * a  # correlated
    x, y = _upper(a), _upper(b)
    pearson = compare_rsms(a, b, method="pearson")
    spearman = compare_rsms(a, b, method="spearman")
    assert pearson.item() == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman.item() == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_kendall_tau_a_matches_brute_force(decimals):
    a, b = _symmetric(12, seed=2, decimals=decimals), _symmetric(12, seed=3, decimals=decimals)
    b = b + a
    expected = _tau_a_brute_force(_upper(a), _upper(b))
    assert compare_rsms(a, b, method="kendall").item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_kendall_tau_a_matches_scipy(decimals):
    a, b = _symmetric(70, seed=4, decimals=decimals), _symmetric(70, seed=5, decimals=decimals)
    b = (b + a).round(decimals=decimals) if decimals else b + a
    expected = _tau_a_from_scipy(_upper(a), _upper(b))
    assert compare_rsms(a, b, method="kendall").item() == pytest.approx(expected, abs=1e-12)
    if decimals is None:  # without ties tau-a is tau-b
        assert expected == pytest.approx(stats.kendalltau(_upper(a), _upper(b)).statistic)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 37])
def test_count_inversions_matches_brute_force(n):
    y = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(n)).double()
    expected = sum(1 for i, j in itertools.combinations(range(n), 2) if y[i] > y[j])
    assert _count_inversions(y) == expected


def test_identical_and_reversed_rankings():
    a = _symmetric(10, seed=6)
    for method in ("pearson", "spearman", "kendall", "cka"):
        assert compare_rsms(a, a, method=method).item() == pytest.approx(1.0, abs=1e-12)
    for method in ("spearman", "kendall"):
        # a distance matrix from the same similarities orders every pair the other way
        assert compare_rsms(a, 1 - a, method=method).item() == pytest.approx(-1.0, abs=1e-12)
        assert compare_rsms(a, a**3, method=method).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_properties():
    a, b = _symmetric(15, seed=7), _symmetric(15, seed=8)
    cka = compare_rsms(a, b, method="cka")
    assert compare_rsms(a, 4.0 * a, method="cka").item() == pytest.approx(1.0, abs=1e-12)
    # isotropic scaling of either matrix and adding a constant change nothing
    torch.testing.assert_close(compare_rsms(0.1 * a, 7.0 * b, method="cka"), cka)
    torch.testing.assert_close(compare_rsms(a + 3.0, b, method="cka"), cka)
    torch.testing.assert_close(compare_rsms(b, a, method="cka"), cka)


def test_cka_of_gram_matrices_is_feature_linear_cka():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 3, generator=g, dtype=torch.float64) + torch.randn(20, 3, generator=g)
    xc, yc = x - x.mean(0), y - y.mean(0)
    # Kornblith et al. (2019), eq. for linear CKA on centred features
    expected = (yc.T @ xc).square().sum() / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    torch.testing.assert_close(compare_rsms(x @ x.T, y @ y.T, method="cka"), expected)
    assert 0 < expected < 1


def test_dtype_and_device_of_result():
    a, b = _symmetric(6, seed=10), _symmetric(6, seed=11)
    assert compare_rsms(a, b).dtype == torch.float64
    assert compare_rsms(a.float(), b.float()).dtype == torch.float32


@pytest.mark.parametrize("method", ["pearson", "spearman", "kendall", "cka"])
def test_constant_rsm_gives_nan_with_warning(method):
    a = _symmetric(5, seed=12)
    with pytest.warns(UserWarning, match="undefined for constant input"):
        score = compare_rsms(a, torch.ones(5, 5, dtype=torch.float64), method=method)
    assert score.isnan()


@pytest.mark.parametrize(
    ("a", "b", "method", "error", "match"),
    [
        (
            torch.eye(3),
            torch.eye(4),
            "pearson",
            ValueError,
            r"same shape, but got \(3, 3\) and \(4, 4\)",
        ),
        (
            torch.ones(3, 4),
            torch.eye(3),
            "pearson",
            ValueError,
            r"`a` to be a square matrix.*\(3, 4\)",
        ),
        (
            torch.eye(3),
            torch.eye(3),
            "rsa",
            ValueError,
            r"`method` to be one of \['cka', 'kendall', 'pearson', 'spearman'\], but got 'rsa'",
        ),
        (
            torch.eye(3),
            torch.eye(3).fill_diagonal_(torch.inf),
            "cka",
            ValueError,
            "`b` to be finite, but got 3 NaN/Inf",
        ),
        (
            torch.eye(3),
            torch.eye(3, dtype=torch.int64),
            "cka",
            TypeError,
            "`b` to have a floating dtype",
        ),
        (np.eye(3), torch.eye(3), "cka", TypeError, "`a` to be a torch.Tensor"),
    ],
)
def test_bad_input(a, b, method, error, match):
    with pytest.raises(error, match=match):
        compare_rsms(a, b, method=method)
