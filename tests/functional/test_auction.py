"""Tests of the batched auction LAP solver against brute force and scipy."""

import numpy as np
import pytest
import torch
from helpers.lap_oracle import brute_force_values, optimal_values

from lightning_rsm.functional.matching.auction import auction_assignment


def _optimum(scores: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(optimal_values(scores))


def _check_result(scores, result, tol, slack=1e-9):
    """Everything a result promises: permutation, its value, a valid bracket, the tolerance."""
    value, upper, assignment = result.value, result.upper, result.permutation
    batch, size, _ = scores.shape
    assert value.dtype == upper.dtype == torch.float64
    assert assignment.dtype == torch.long
    assert value.shape == upper.shape == (batch,)
    assert assignment.shape == (batch, size)
    assert torch.equal(assignment.sort(dim=1).values, torch.arange(size).expand(batch, size))
    taken = scores.double().gather(2, assignment.unsqueeze(2)).sum(dim=(1, 2))
    torch.testing.assert_close(value, taken, rtol=0, atol=1e-12 * (1 + taken.abs().max()))
    optimum = _optimum(scores)
    assert (value <= optimum + slack).all()
    assert (upper >= optimum - slack).all()
    if tol is not None:
        assert (upper - value <= tol).all()


def test_hand_solved():
    # Rows 0 and 1 both prefer column 0; greedy takes 10 + 1, the optimum is 9 + 9 + 0.
    scores = torch.tensor([[[10.0, 9.0, 0.0], [9.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    result = auction_assignment(scores, tol=1e-6)
    assert result.permutation.tolist() == [[1, 0, 2]]
    assert result.value.item() == 18.0
    assert result.value.item() <= result.upper.item() <= result.value.item() + 1e-6


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_matches_brute_force(size):
    gen = torch.Generator().manual_seed(size)
    scores = torch.randn(20, size, size, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores, tol=1e-7)
    brute = brute_force_values(scores)
    assert (result.value <= brute + 1e-12).all()
    assert (result.upper >= brute - 1e-12).all()
    assert (result.upper - result.value <= 1e-7).all()
    _check_result(scores, result, 1e-7)


@pytest.mark.parametrize(("size", "batch"), [(2, 50), (7, 40), (20, 30), (49, 20), (196, 2)])
def test_random_agrees_with_scipy(size, batch):
    gen = torch.Generator().manual_seed(100 + size)
    scores = torch.rand(batch, size, size, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores, tol=1e-4)
    _check_result(scores, result, 1e-4)


def test_gram_blocks_like_rsm_inputs():
    # Score matrices as semantic_rsm forms them: inner products of ReLU concept vectors.
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(6, 49, 16, generator=gen).relu()
    scores = torch.einsum("isc,jtc->ijst", feats, feats).reshape(36, 49, 49)
    result = auction_assignment(scores, tol=1e-3)
    _check_result(scores, result, 1e-3, slack=1e-6)


@pytest.mark.parametrize(
    "scores",
    [
        torch.full((3, 5, 5), 2.5),  # constant: every permutation is optimal
        torch.zeros(2, 4, 4),
        torch.eye(6).expand(2, 6, 6) * -1.0,  # identity is the worst permutation
        torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]),
        torch.tensor([[[-3.0]], [[7.0]]]),  # S = 1
        torch.arange(64.0).reshape(1, 8, 8),  # every permutation has the same value
        torch.ones(1, 5, 5).tril(),  # ties everywhere except below the diagonal
    ],
    ids=["constant", "zeros", "minus-identity", "two-by-two", "one-by-one", "sum-matrix", "tril"],
)
def test_degenerate_matrices(scores):
    result = auction_assignment(scores, tol=1e-6)
    _check_result(scores, result, 1e-6)


def test_integer_ties_and_negative_values():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 3, (40, 12, 12), generator=gen)
    result = auction_assignment(scores, tol=0.5)
    # Integer scores have an integer optimum; a gap below 1 makes the value optimal.
    torch.testing.assert_close(result.value, _optimum(scores), rtol=0, atol=0)
    _check_result(scores, result, 0.5)


def test_large_magnitudes_with_scaled_tolerance():
    gen = torch.Generator().manual_seed(4)
    scores = 1e6 * torch.randn(10, 15, 15, generator=gen, dtype=torch.float64) - 5e6
    result = auction_assignment(scores, tol=1e-2)
    _check_result(scores, result, 1e-2, slack=1e-6)


@pytest.mark.parametrize("magnitude", [1e-300, 1e150, 1e300])
def test_extreme_magnitudes(magnitude):
    gen = torch.Generator().manual_seed(14)
    scores = magnitude * torch.rand(5, 6, 6, generator=gen, dtype=torch.float64)
    tol = 1e-6 * magnitude
    result = auction_assignment(scores, tol=tol)
    _check_result(scores, result, tol, slack=1e-12 * magnitude)


def test_tolerance_far_above_the_scores_keeps_the_bracket():
    # With prices on the scale of tol, the scores would vanish in their rounding.
    gen = torch.Generator().manual_seed(13)
    scores = 1e-20 * torch.rand(20, 6, 6, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores, tol=1.0)
    _check_result(scores, result, 1.0, slack=1e-30)


@pytest.mark.parametrize("tol", [1.0, 1e-2, 1e-5, 1e-9])
def test_tolerance_is_respected(tol):
    gen = torch.Generator().manual_seed(5)
    scores = torch.rand(15, 10, 10, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores, tol=tol)
    _check_result(scores, result, tol)


def test_per_problem_tolerance():
    gen = torch.Generator().manual_seed(6)
    scores = torch.rand(3, 12, 12, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 100.0, 1e4]
    ).view(3, 1, 1)
    tol = torch.tensor([1e-6, 1e-4, 1e-2])
    result = auction_assignment(scores, tol=tol)
    assert (result.upper - result.value <= tol).all()
    _check_result(scores, result, None)


@pytest.mark.parametrize("max_iter", [0, 1, 3])
def test_max_iter_still_gives_permutation_and_valid_bounds(max_iter):
    gen = torch.Generator().manual_seed(8)
    scores = torch.rand(10, 20, 20, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores, tol=1e-8, max_iter=max_iter)
    _check_result(scores, result, None)


def test_batch_does_not_change_each_result():
    gen = torch.Generator().manual_seed(9)
    scores = torch.rand(6, 9, 9, generator=gen, dtype=torch.float64)
    together = auction_assignment(scores, tol=1e-5)
    for b in range(6):
        alone = auction_assignment(scores[b : b + 1], tol=1e-5)
        assert alone.duals is alone.rows is None
        for batched, single in zip(together[:3], alone[:3], strict=True):
            assert torch.equal(batched[b : b + 1], single)


def test_invariant_to_permuting_rows_and_columns():
    gen = torch.Generator().manual_seed(10)
    scores = torch.rand(5, 11, 11, generator=gen, dtype=torch.float64)
    rows, cols = torch.randperm(11, generator=gen), torch.randperm(11, generator=gen)
    value, upper = auction_assignment(scores, tol=1e-6)[:2]
    value_p, upper_p = auction_assignment(scores[:, rows][:, :, cols], tol=1e-6)[:2]
    # Both brackets contain the same optimum, so they overlap.
    assert (value <= upper_p).all()
    assert (value_p <= upper).all()


def test_float32_and_integer_inputs():
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(4, 8, 8, generator=gen)
    result = auction_assignment(scores, tol=1e-5)
    _check_result(scores, result, 1e-5)
    ints = torch.randint(0, 100, (4, 8, 8), generator=gen, dtype=torch.int32)
    result = auction_assignment(ints, tol=0.5)
    _check_result(ints, result, 0.5)


def test_empty_batch():
    result = auction_assignment(torch.zeros(0, 4, 4))
    assert result.value.shape == result.upper.shape == (0,)
    assert result.permutation.shape == (0, 4)


def test_does_not_track_gradients():
    scores = torch.rand(2, 4, 4, requires_grad=True)
    result = auction_assignment(scores)
    assert not result.value.requires_grad
    assert not result.upper.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(12)
    scores = torch.rand(20, 30, 30, generator=gen, dtype=torch.float64)
    result = auction_assignment(scores.cuda(), tol=1e-5)
    assert {t.device.type for t in result[:3]} == {"cuda"}
    _check_result(scores, type(result)(*(t.cpu() for t in result[:3])), 1e-5)


@pytest.mark.parametrize(
    ("scores", "kwargs", "error", "match"),
    [
        (np.zeros((1, 2, 2)), {}, TypeError, "torch.Tensor, but got ndarray"),
        (torch.zeros(2, 2), {}, ValueError, r"\(B, S, S\), but got shape \(2, 2\)"),
        (torch.zeros(1, 2, 3), {}, ValueError, r"but got shape \(1, 2, 3\)"),
        (torch.zeros(1, 0, 0), {}, ValueError, r"but got shape \(1, 0, 0\)"),
        (torch.zeros(1, 2, 2, dtype=torch.bool), {}, TypeError, "real dtype"),
        (torch.zeros(1, 2, 2, dtype=torch.complex64), {}, TypeError, "real dtype"),
        (torch.tensor([[[0.0, float("nan")], [0.0, 0.0]]]), {}, ValueError, "1 NaN/Inf"),
        (torch.tensor([[[0.0, float("inf")], [0.0, 0.0]]]), {}, ValueError, "1 NaN/Inf"),
        (torch.zeros(1, 2, 2), {"tol": 0.0}, ValueError, "`tol` to be a positive"),
        (torch.zeros(1, 2, 2), {"tol": -1e-3}, ValueError, "`tol` to be a positive"),
        (torch.zeros(1, 2, 2), {"tol": float("nan")}, ValueError, "`tol` to be a positive"),
        (torch.zeros(1, 2, 2), {"tol": True}, ValueError, "`tol` to be a positive"),
        (torch.zeros(1, 2, 2), {"tol": "1e-3"}, ValueError, "`tol` to be a positive"),
        (torch.zeros(2, 2, 2), {"tol": torch.ones(3)}, ValueError, r"shape \(2,\)"),
        (torch.zeros(2, 2, 2), {"tol": torch.tensor([1.0, 0.0])}, ValueError, "but got 0.0"),
        (torch.zeros(1, 2, 2), {"tol": torch.tensor(True)}, TypeError, "`tol` to have a real"),
        (torch.zeros(1, 2, 2), {"max_iter": -1}, ValueError, "`max_iter` to be None"),
        (torch.zeros(1, 2, 2), {"max_iter": 2.0}, ValueError, "`max_iter` to be None"),
    ],
)
def test_bad_inputs_raise(scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        auction_assignment(scores, **kwargs)
