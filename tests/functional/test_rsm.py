"""semantic_rsm / spatio_semantic_rsm: hand-solved cases, brute force and the properties."""

import itertools
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_rsm.functional import semantic_rsm, spatio_semantic_rsm

KERNELS = ["inner", "cosine", "rbf"]


def brute_force_values(x: torch.Tensor) -> torch.Tensor:
    """v_ij by trying all S! permutations of the (N, S, C) concept vectors."""
    n, s, _ = x.shape
    x = x.double()
    v = torch.empty(n, n, dtype=torch.float64)
    perms = list(itertools.permutations(range(s)))
    for i in range(n):
        for j in range(n):
            m = x[i] @ x[j].T
            v[i, j] = max(sum(m[a, p[a]] for a in range(s)) for p in perms)
    return v


def relu_maps(n=6, c=5, h=2, w=3, seed=0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)).relu()


def test_hand_solved_pair():
    # Sample a has concepts e1 at position 0 and e2 at position 1; b has them swapped and scaled.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (1, C=2, H=1, W=2)
    b = torch.tensor([[0.0, 2.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    x = torch.cat([a, b])
    inner = semantic_rsm(x, kernel="inner")
    # Optimal alignment pairs e1 with 2*e1 and e2 with e2: 2 + 1 = 3; flattened: 0.
    assert inner.tolist() == [[2.0, 3.0], [3.0, 5.0]]
    assert spatio_semantic_rsm(x, kernel="inner").tolist() == [[2.0, 0.0], [0.0, 5.0]]
    cosine = semantic_rsm(x)
    assert cosine[0, 1].item() == pytest.approx(3 / math.sqrt(2 * 5))
    rbf = semantic_rsm(x, kernel="rbf", sigma=1.0)
    # d2 = 2 + 5 - 2 * 3 = 1
    assert rbf[0, 1].item() == pytest.approx(math.exp(-0.5))


@pytest.mark.parametrize("matcher", ["exact"])
@pytest.mark.parametrize("s_shape", [(1, 1), (1, 2), (2, 2), (2, 3)])
def test_exact_matches_brute_force(matcher, s_shape):
    x = relu_maps(n=5, c=4, h=s_shape[0], w=s_shape[1], seed=sum(s_shape))
    concepts = x.flatten(2).transpose(1, 2)
    expected = brute_force_values(concepts)
    got = semantic_rsm(x.double(), kernel="inner", matcher=matcher)
    torch.testing.assert_close(got, expected)


def test_tokens_and_vectors_shapes():
    tokens = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        semantic_rsm(tokens.double(), kernel="inner"), brute_force_values(tokens)
    )
    vectors = torch.randn(4, 7)
    torch.testing.assert_close(semantic_rsm(vectors), spatio_semantic_rsm(vectors))


@pytest.mark.parametrize("kernel", KERNELS)
def test_invariant_to_any_permutation_of_positions(kernel):
    x = relu_maps(n=5, c=6, h=3, w=3)
    flat = x.flatten(2)
    gen = torch.Generator().manual_seed(3)
    permuted = torch.stack([f[:, torch.randperm(9, generator=gen)] for f in flat]).reshape(x.shape)
    torch.testing.assert_close(
        semantic_rsm(x, kernel=kernel), semantic_rsm(permuted, kernel=kernel), rtol=1e-5, atol=1e-5
    )


def test_circular_shift_has_cosine_one_and_baseline_drops():
    a = relu_maps(n=1, c=8, h=5, w=5)
    x = torch.cat([a, a.roll(1, dims=3), a.roll((2, -1), dims=(2, 3))])
    sem = semantic_rsm(x)
    torch.testing.assert_close(sem, torch.ones(3, 3), rtol=0, atol=1e-6)
    base = spatio_semantic_rsm(x)
    assert base[0, 1] < 0.99


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("matcher", ["exact", "windowed", "greedy", "auction"])
def test_symmetric_with_exact_diagonal(kernel, matcher):
    x = relu_maps(n=7, c=5, h=3, w=2)
    k = semantic_rsm(x, kernel=kernel, matcher=matcher)
    assert k.shape == (7, 7)
    torch.testing.assert_close(k, k.T, rtol=0, atol=0)
    if kernel == "inner":
        torch.testing.assert_close(k.diagonal(), x.square().sum((1, 2, 3)))
    else:
        torch.testing.assert_close(k.diagonal(), torch.ones(7))


def test_cross_rsm_agrees_with_symmetric_and_is_transpose():
    x = relu_maps(n=6, c=4, h=2, w=3)
    full = semantic_rsm(x, kernel="inner")
    cross = semantic_rsm(x[:2], x[2:], kernel="inner")
    torch.testing.assert_close(cross, full[:2, 2:])
    torch.testing.assert_close(semantic_rsm(x[2:], x[:2], kernel="inner"), cross.T)


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_position_equals_baseline(kernel):
    x = torch.randn(6, 5, 1, 1)
    torch.testing.assert_close(
        semantic_rsm(x, kernel=kernel), spatio_semantic_rsm(x, kernel=kernel), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kernel", ["inner", "cosine"])
def test_semantic_at_least_baseline(kernel):
    x = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    sem = semantic_rsm(x, kernel=kernel)
    base = spatio_semantic_rsm(x, kernel=kernel)
    assert bool((sem >= base - 1e-5).all())
    assert bool((sem > base + 1e-3).any())


@pytest.mark.parametrize("matcher", ["windowed", "greedy", "auction"])
def test_approximations_never_exceed_exact_and_gap_is_certified(matcher):
    x = relu_maps(n=8, c=6, h=4, w=4, seed=2)
    exact = semantic_rsm(x, kernel="inner", matcher="exact")
    approx, gap = semantic_rsm(
        x, kernel="inner", matcher=matcher, window=4, tol=0.05, return_gap=True
    )
    assert bool((approx <= exact + 1e-4).all())
    assert bool((approx + gap >= exact - 1e-4).all())
    assert bool((approx < exact - 1e-4).any()), "test data too easy: approximation was exact"
    for kernel in ("cosine", "rbf"):
        k_exact = semantic_rsm(x, kernel=kernel, sigma=3.0)
        k_approx, k_gap = semantic_rsm(
            x, kernel=kernel, matcher=matcher, window=4, tol=0.05, sigma=3.0, return_gap=True
        )
        assert bool((k_approx <= k_exact + 1e-5).all())
        assert bool((k_approx + k_gap >= k_exact - 1e-5).all())


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
def test_auction_certifies_the_requested_cosine_tolerance(tol):
    x = relu_maps(n=10, c=8, h=4, w=4, seed=4)
    exact = semantic_rsm(x.double())
    rsm, gap = semantic_rsm(x.double(), matcher="auction", tol=tol, return_gap=True)
    assert float(gap.max()) <= tol
    assert bool((rsm <= exact + 1e-12).all())
    assert bool((rsm + gap >= exact - 1e-12).all())


def test_exact_gap_is_zero_and_large_window_is_exact():
    x = relu_maps(n=5, c=3, h=2, w=2)
    rsm, gap = semantic_rsm(x, return_gap=True)
    assert bool((gap == 0).all())
    torch.testing.assert_close(semantic_rsm(x, matcher="windowed", window=4), rsm)


def test_rbf_median_heuristic():
    x = relu_maps(n=6, c=4, h=2, w=2)
    lin = semantic_rsm(x.double(), kernel="inner")
    sq = lin.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * lin
    iu = torch.triu_indices(6, 6, offset=1)
    sigma_sq = d2[iu[0], iu[1]].median()
    expected = torch.exp(-d2.clamp_min(0) / (2 * sigma_sq))
    torch.testing.assert_close(semantic_rsm(x.double(), kernel="rbf"), expected)


def test_block_size_workers_and_dtype_do_not_change_result():
    x = relu_maps(n=9, c=4, h=3, w=3)
    ref = semantic_rsm(x, kernel="inner", block_size=1, num_workers=1)
    for block_size, workers in [(3, 2), (7, 1), (None, None)]:
        got = semantic_rsm(x, kernel="inner", block_size=block_size, num_workers=workers)
        torch.testing.assert_close(got, ref)
    assert semantic_rsm(x.double()).dtype == torch.float64
    assert semantic_rsm(x.half()).dtype == torch.float32


def test_pooling_caps_positions():
    x = relu_maps(n=4, c=3, h=8, w=8)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, (2, 2))
    torch.testing.assert_close(semantic_rsm(x, max_positions=4), semantic_rsm(pooled))


def test_zero_sample_has_zero_cosine():
    x = relu_maps(n=3, c=3, h=2, w=2)
    x[1] = 0
    k = semantic_rsm(x)
    assert k[1].tolist() == [0.0, 0.0, 0.0]


def test_progress_bar_runs(capsys):
    semantic_rsm(relu_maps(n=4, c=2, h=2, w=2), progress=True)
    assert "pair" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": torch.zeros(3, 4, 5, 6, 7)}, ValueError, r"\(N, C, H, W\), \(N, T, D\) or \(N, D\)"),
        ({"x": torch.zeros(1, 4)}, ValueError, "at least 2 samples"),
        ({"x": [[1.0]]}, TypeError, "torch.Tensor"),
        ({"x": torch.zeros(3, 4, 2), "y": torch.zeros(2, 5, 2)}, ValueError, "same shape"),
        ({"x": torch.zeros(3, 4, 2), "y": torch.zeros(2, 4)}, ValueError, "same shape"),
        ({"kernel": "linear"}, ValueError, r"\['cosine', 'inner', 'rbf'\].*'linear'"),
        ({"matcher": "hungarian"}, ValueError, r"\['auction', 'exact', 'greedy', 'windowed'\]"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"sigma": 0.0, "kernel": "rbf"}, ValueError, "sigma"),
        ({"window": 0}, ValueError, "window"),
        ({"block_size": -1}, ValueError, "block_size"),
        ({"num_workers": 1.5}, ValueError, "num_workers"),
        ({"max_positions": 0}, ValueError, "max_positions"),
        ({"x": torch.zeros(3, 2, 0, 2)}, ValueError, "empty dimension"),
        ({"x": torch.zeros(3, 2, 2, dtype=torch.complex64)}, TypeError, "real dtype"),
        ({"x": torch.zeros(3, 2, 2, dtype=torch.float8_e4m3fn)}, TypeError, "`x` to have a real"),
        ({"y": torch.rand(3, 2, 2, 2, dtype=torch.float64)}, TypeError, "`y` to have the dtype"),
        ({"y": torch.rand(3, 2, 2, 2).bfloat16()}, TypeError, "`y` to have the dtype of `x`"),
        ({"should_stop": True}, TypeError, "`should_stop` to be callable"),
    ],
)
def test_validation_errors(kwargs, error, match):
    args = {"x": torch.rand(3, 2, 2, 2), **kwargs}
    with pytest.raises(error, match=match):
        semantic_rsm(**args)


def test_non_finite_input_reports_count_and_location():
    x = torch.rand(4, 2, 3, 3)
    x[2, 1, 0, 2] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN/Inf values in 2 sample\(s\).*\(2, 1, 0, 2\)"):
        semantic_rsm(x)
    with pytest.raises(ValueError, match="`y` to be finite"):
        semantic_rsm(torch.rand(4, 2, 3, 3), x)
    with pytest.raises(ValueError, match="`x` to be finite"):
        spatio_semantic_rsm(x)


def test_ctrl_c_stops_a_long_computation():
    script = (
        "import signal, torch; from lightning_rsm.functional import semantic_rsm\n"
        # A background shell may start us with SIGINT ignored; a user's terminal does not.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "x = torch.randn(1000, 64, 8, 8).relu()\n"
        "print('started', flush=True)\n"
        "semantic_rsm(x, progress=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.stdout.readline().strip() == "started"
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "pair" in err  # the progress bar was running


@pytest.mark.parametrize("function", [semantic_rsm, spatio_semantic_rsm])
@pytest.mark.parametrize(
    ("dtype", "factor"),
    [
        (torch.float32, 1e20),
        (torch.float32, 1e-25),
        (torch.float64, 1e200),
        (torch.float64, 1e-200),
    ],
)
@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_finite_inputs_far_from_one_give_the_rsm_of_the_unscaled_inputs(
    function, dtype, factor, kernel
):
    x = relu_maps(n=5, c=4, h=2, w=3).to(dtype)
    got = function(x * factor, kernel=kernel, **({"sigma": factor} if kernel == "rbf" else {}))
    expected = function(x, kernel=kernel, **({"sigma": 1.0} if kernel == "rbf" else {}))
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matcher", ["exact", "windowed", "greedy", "auction"])
def test_every_matcher_survives_scores_beyond_float32(matcher):
    x = relu_maps(n=4, c=3, h=2, w=2)
    expected = semantic_rsm(x, matcher=matcher)
    torch.testing.assert_close(semantic_rsm(x * 1e20, matcher=matcher), expected, atol=1e-5, rtol=0)


def test_samples_of_very_different_scales_keep_their_cosines():
    x = relu_maps(n=4, c=3, h=2, w=2).double()
    scales = torch.tensor([1e-150, 1.0, 1e150, 1e300], dtype=torch.float64).view(-1, 1, 1, 1)
    torch.testing.assert_close(semantic_rsm(x * scales), semantic_rsm(x))
    torch.testing.assert_close(spatio_semantic_rsm(x * scales), spatio_semantic_rsm(x))


def test_inputs_scaled_by_powers_of_two_give_the_same_bits():
    x = relu_maps(n=5, c=4, h=2, w=3)
    assert torch.equal(semantic_rsm(x * 2.0**100), semantic_rsm(x))
    assert torch.equal(spatio_semantic_rsm(x * 2.0**100), spatio_semantic_rsm(x))
    assert torch.equal(
        semantic_rsm(x * 2.0**40, kernel="inner"), semantic_rsm(x, kernel="inner") * 2.0**80
    )


def test_large_but_representable_inner_products_are_right():
    x = relu_maps(n=4, c=3, h=2, w=2).double()
    torch.testing.assert_close(
        semantic_rsm(x * 1e150, kernel="inner"), semantic_rsm(x, kernel="inner") * 1e300
    )
    cross = semantic_rsm(x * 1e30, x[:2] * 1e-30, kernel="inner")  # x alone would overflow float32
    torch.testing.assert_close(cross, semantic_rsm(x, x[:2], kernel="inner"))


@pytest.mark.parametrize(
    ("function", "x", "kwargs"),
    [
        (semantic_rsm, relu_maps().mul(1e19), {}),
        (spatio_semantic_rsm, relu_maps().mul(1e19), {}),
        (semantic_rsm, relu_maps().double().mul(1e200), {}),
        (semantic_rsm, relu_maps().double().mul(1e200), {"y": relu_maps(n=2).double().mul(1e200)}),
    ],
)
def test_inner_products_beyond_the_dtype_raise_naming_x(function, x, kwargs):
    with pytest.raises(ValueError, match=r"inner products of `x`.* to fit in torch.float"):
        function(x, kernel="inner", **kwargs)
