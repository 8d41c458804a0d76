"""Matchers on blocks of score matrices, against scipy and brute force; the solvers' contract."""

import pytest
import torch
from helpers.lap_oracle import brute_force_values, optimal_values

from lightning_rsm.functional import (
    Assignment,
    assignment_upper_bound,
    auction_assignment,
    linear_assignment_batch,
    match_exact,
    match_greedy,
    match_windowed,
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6])
def test_exact_equals_brute_force(size):
    scores = torch.randn(20, size, size, generator=torch.Generator().manual_seed(size))
    result = match_exact(scores)
    torch.testing.assert_close(result.value, brute_force_values(scores))
    torch.testing.assert_close(result.upper, result.value)


def test_exact_on_ties_and_negative_scores():
    scores = torch.stack([torch.zeros(4, 4), -torch.ones(4, 4), torch.eye(4), -torch.eye(4)])
    assert match_exact(scores).value.tolist() == [0.0, -4.0, 4.0, 0.0]


def test_approximations_are_feasible_lower_bounds():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 6, 6, generator=gen)
    exact = brute_force_values(scores)
    norms = torch.rand(50, 6, generator=gen)
    for result in (
        match_greedy(scores),
        match_windowed(scores, norms, norms.flip(1), window=2),
    ):
        assert bool((result.value <= exact + 1e-9).all())
        assert bool((result.upper >= exact - 1e-9).all())
    assert bool((match_greedy(scores).value < exact - 1e-6).any())


def test_greedy_misses_optimum_by_hand():
    # Greedy takes 10 at (0, 0), then 1 at (2, 2), then 0 at (1, 1): 11. Optimal: 9 + 9 + 1.
    scores = torch.tensor([[[10.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    greedy = match_greedy(scores)
    assert greedy.value.tolist() == [11.0]
    assert greedy.permutation.tolist() == [[0, 1, 2]]
    exact = match_exact(scores)
    assert optimal_values(scores).tolist() == exact.value.tolist() == [19.0]
    assert exact.permutation.tolist() == [[1, 0, 2]]


def test_windowed_matches_within_norm_ranked_windows():
    # Row sample's vectors by norm: 0, 1, 2; column sample's: 2, 1, 0 (descending).
    scores = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0]]])
    nx = torch.tensor([[3.0, 2.0, 1.0]])
    ny = torch.tensor([[1.0, 2.0, 3.0]])
    # window 1 pairs the i-th largest norms: rows 0, 1, 2 with columns 2, 1, 0
    result = match_windowed(scores, nx, ny, window=1)
    assert result.value.tolist() == [9.0]
    assert result.permutation.tolist() == [[2, 1, 0]]
    result = match_windowed(scores, nx, ny.flip(1), window=1)
    assert result.value.tolist() == [3.0]
    assert result.permutation.tolist() == [[0, 1, 2]]
    assert match_windowed(scores, nx, ny.flip(1), window=3).value.tolist() == [9.0]


def test_upper_bound_by_hand():
    scores = torch.tensor([[[3.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [5.0, 0.0]]])
    assert assignment_upper_bound(scores).tolist() == [4.0, 6.0]


def _windowed(scores):
    batch, size = (len(scores), scores.shape[-1]) if isinstance(scores, torch.Tensor) else (0, 0)
    norms = torch.arange(size, 0, -1.0).expand(batch, size)  # windows {0, 1}, {2, 3}, ...
    return match_windowed(scores, norms, norms, window=2)


# every solver entry point of functional/matching, called on scores alone
SOLVERS = {
    "exact": match_exact,
    "windowed": _windowed,
    "greedy": match_greedy,
    "auction": lambda scores: auction_assignment(scores, tol=1e-6),
    "linear_assignment_batch": linear_assignment_batch,
}


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_every_solver_returns_a_permutation_its_value_and_bounds(solver, size):
    scores = torch.randn(30, size, size, generator=torch.Generator().manual_seed(size))
    result = solver(scores)
    assert isinstance(result, Assignment)
    assert result.value.shape == result.upper.shape == (30,)
    assert result.value.dtype == result.upper.dtype == torch.float64
    assert result.permutation.shape == (30, size)
    assert result.permutation.dtype == torch.long
    assert (result.permutation.sort(dim=1).values == torch.arange(size)).all()
    own = scores.double().gather(2, result.permutation.unsqueeze(2)).sum(dim=(1, 2))
    torch.testing.assert_close(result.value, own, rtol=1e-12, atol=1e-12)
    exact = torch.as_tensor(optimal_values(scores))
    assert bool((result.value <= exact + 1e-9).all())
    assert bool((result.upper >= exact - 1e-9).all())
    torch.testing.assert_close(result.gap, result.upper - result.value)


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_every_solver_takes_integer_scores_and_empty_batches(solver):
    scores = torch.tensor([[[3, 1, 0], [1, 2, 0], [0, 0, 1]]])
    assert solver(scores).value.tolist() == [6.0]
    empty = solver(torch.zeros(0, 3, 3))
    assert empty.value.shape == (0,)
    assert empty.permutation.shape == (0, 3)


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (torch.zeros(2, 3), ValueError, r"`scores` .*\(B, S, S\), but got shape \(2, 3\)\.$"),
        (torch.zeros(2, 3, 4), ValueError, r"\(B, S, S\), but got shape \(2, 3, 4\)"),
        (torch.zeros(2, 0, 0), ValueError, r"\(B, S, S\), but got shape \(2, 0, 0\)"),
        (torch.zeros(2, 3, 3, dtype=torch.bool), TypeError, "`scores` to have a real dtype"),
        (torch.zeros(2, 3, 3, dtype=torch.complex64), TypeError, "real dtype, but got"),
        (torch.full((1, 2, 2), float("nan")), ValueError, "`scores` to be finite, but got 4 NaN"),
        ("abc", TypeError, "`scores` to be a torch.Tensor, but got str"),
    ],
)
@pytest.mark.parametrize("solver", [*SOLVERS.values(), assignment_upper_bound])
def test_one_check_for_every_solver(scores, error, match, solver):
    with pytest.raises(error, match=match):
        solver(scores)
