"""Matchers on blocks of score matrices, against scipy and brute force."""

import pytest
import torch
from helpers.lap_oracle import brute_force_values, optimal_values

from lightning_rsm.functional import (
    assignment_upper_bound,
    match_exact,
    match_greedy,
    match_windowed,
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6])
def test_exact_equals_brute_force(size):
    scores = torch.randn(20, size, size, generator=torch.Generator().manual_seed(size))
    value, upper = match_exact(scores)
    torch.testing.assert_close(value, brute_force_values(scores))
    torch.testing.assert_close(upper, value)


def test_exact_on_ties_and_negative_scores():
    scores = torch.stack([torch.zeros(4, 4), -torch.ones(4, 4), torch.eye(4), -torch.eye(4)])
    value, _ = match_exact(scores)
    assert value.tolist() == [0.0, -4.0, 4.0, 0.0]


def test_approximations_are_feasible_lower_bounds():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 6, 6, generator=gen)
    exact = brute_force_values(scores)
    norms = torch.rand(50, 6, generator=gen)
    for value, upper in (
        match_greedy(scores),
        match_windowed(scores, norms, norms.flip(1), window=2),
    ):
        assert bool((value <= exact + 1e-9).all())
        assert bool((upper >= exact - 1e-9).all())
    greedy, _ = match_greedy(scores)
    assert bool((greedy < exact - 1e-6).any())


def test_greedy_misses_optimum_by_hand():
    # Greedy takes 10 at (0, 0), then 1 at (2, 2), then 0 at (1, 1): 11. Optimal: 9 + 9 + 1.
    scores = torch.tensor([[[10.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    assert match_greedy(scores)[0].tolist() == [11.0]
    assert optimal_values(scores).tolist() == match_exact(scores)[0].tolist() == [19.0]


def test_windowed_matches_within_norm_ranked_windows():
    # Row sample's vectors by norm: 0, 1, 2; column sample's: 2, 1, 0 (descending).
    scores = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]])
    nx = torch.tensor([[3.0, 2.0, 1.0]])
    ny = torch.tensor([[1.0, 2.0, 3.0]])
    assert match_windowed(scores, nx, ny, window=1)[0].tolist() == [9.0]
    assert match_windowed(scores, nx, ny.flip(1), window=1)[0].tolist() == [3.0]
    assert match_windowed(scores, nx, ny.flip(1), window=3)[0].tolist() == [9.0]


def test_upper_bound_by_hand():
    scores = torch.tensor([[[3.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [5.0, 0.0]]])
    assert assignment_upper_bound(scores).tolist() == [4.0, 6.0]


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (torch.zeros(2, 3), ValueError, r"\(B, S, S\).*\(2, 3\)"),
        (torch.zeros(2, 3, 4), ValueError, r"\(B, S, S\)"),
        (torch.zeros(2, 3, 3, dtype=torch.long), TypeError, "floating"),
        (torch.full((1, 2, 2), float("nan")), ValueError, "4 NaN/Inf"),
        ("abc", TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("matcher", [match_exact, match_greedy])
def test_bad_scores(scores, error, match, matcher):
    with pytest.raises(error, match=match):
        matcher(scores)
