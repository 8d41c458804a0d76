"""The shared tensor checks: what they accept and the one-line errors they raise."""

import pytest
import torch

from lightning_rsm.functional.checks import check_finite


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    check_finite(torch.full((4,), 6e4, dtype=torch.float16), "x")  # the sum is inf in float16
    check_finite(torch.tensor([1e308, 1e308], dtype=torch.float64), "x")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_counts_and_locates_the_first_bad_value(bad):
    x = torch.zeros(2, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"1 NaN/Inf values; the first at index \(1, 2\)\.$"):
        check_finite(x, "x")


def test_check_finite_skips_integer_tensors():
    check_finite(torch.tensor([2**62, 2**62]), "x")
