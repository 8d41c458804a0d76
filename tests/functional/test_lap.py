"""The numba LAP solver (cold and warm) and the warm-start cache of semantic_rsm."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers.lap_oracle import optimal_values

from lightning_rsm.functional import (
    AssignmentCache,
    linear_assignment_batch,
    match_exact,
    semantic_rsm,
)
from lightning_rsm.functional.matching import lap
from lightning_rsm.functional.matching.jonker_volgenant import _certified

needs_numba = pytest.mark.skipif(not lap.HAVE_NUMBA, reason="numba is not importable")
# The compiled kernels also run on the oldest numba and numpy declared (`make test-oldest`).
pytestmark = pytest.mark.oldest


def _problems(kind: str, batch: int, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal((batch, size, size))
    if kind == "integer":  # many ties
        return rng.integers(0, 3, (batch, size, size)).astype(np.float64)
    if kind == "relu":  # sparse, many zero entries
        return np.maximum(rng.standard_normal((batch, size, size)), 0.0)
    if kind == "zeros":
        return np.zeros((batch, size, size))
    if kind == "low_rank":  # scores of non-negative concept vectors, as in a trained CNN
        a = np.maximum(rng.standard_normal((batch, size, 3)), 0.0)
        b = np.maximum(rng.standard_normal((batch, size, 3)), 0.0)
        return 1e3 * a @ b.transpose(0, 2, 1)
    raise AssertionError(kind)


def _check_optimal(scores: np.ndarray, result) -> None:
    """Permutations whose value is reported and equals scipy's optimum."""
    size = scores.shape[1]
    value, permutation = result.value.numpy(), result.permutation.numpy()
    assert (np.sort(permutation, axis=1) == np.arange(size)).all()
    own = np.take_along_axis(scores, permutation[:, :, None], axis=2).sum(axis=(1, 2))
    scale = 1e-12 * np.maximum(1.0, np.abs(scores).max(axis=(1, 2)) * size)
    np.testing.assert_allclose(value, own, rtol=0, atol=scale.max())
    assert (np.abs(value - optimal_values(scores)) <= scale).all()


KINDS = ("normal", "integer", "relu", "zeros", "low_rank")


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 40])
def test_cold_matches_scipy(kind, size):
    scores = _problems(kind, 40, size, np.random.default_rng(size))
    result = linear_assignment_batch(scores)
    _check_optimal(scores, result)
    # the duals certify it: u_i = min_j (c_ij - v_j) is feasible, and assigned edges are tight
    cost = -scores
    reduced = cost - result.duals.numpy()[:, None, :]
    reduced -= reduced.min(axis=2, keepdims=True)
    tight = np.take_along_axis(reduced, result.permutation.numpy()[:, :, None], axis=2)
    assert tight.max() <= 1e-12 * max(1.0, np.abs(scores).max())
    assert (result.rows[:, 0] == size).all()


@needs_numba
@pytest.mark.parametrize("size", range(1, 7))
def test_brute_force(size):
    rng = np.random.default_rng(10 + size)
    scores = np.concatenate([_problems(kind, 4, size, rng) for kind in KINDS])
    perms = np.array(list(itertools.permutations(range(size))))
    best = scores[:, np.arange(size), perms].sum(axis=2).max(axis=1)
    result = linear_assignment_batch(scores)
    np.testing.assert_allclose(result.value.numpy(), best, rtol=1e-12, atol=1e-9)
    # warm-started from the solution of a quite different problem: still the brute-force optimum
    after = scores + rng.standard_normal(scores.shape)
    warm = linear_assignment_batch(after, assignment=result.permutation, duals=result.duals)
    best = after[:, np.arange(size), perms].sum(axis=2).max(axis=1)
    np.testing.assert_allclose(warm.value.numpy(), best, rtol=1e-12, atol=1e-9)


@needs_numba
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-3, 1.0])
def test_warm_start_from_perturbed_problem_is_exact(kind, noise):
    rng = np.random.default_rng(1)
    before = _problems(kind, 40, 24, rng)
    after = before + noise * np.abs(before).max() * rng.standard_normal(before.shape)
    first = linear_assignment_batch(before)
    warm = linear_assignment_batch(after, assignment=first.permutation, duals=first.duals)
    _check_optimal(after, warm)
    if noise == 0.0:  # nothing changed: every row is kept, nothing is re-solved
        assert (warm.rows == 0).all()


@needs_numba
def test_warm_start_saves_work_on_small_drift():
    rng = np.random.default_rng(2)
    before = rng.standard_normal((200, 36, 36))
    after = before + 1e-3 * rng.standard_normal(before.shape)
    first = linear_assignment_batch(before)
    warm = linear_assignment_batch(after, assignment=first.permutation, duals=first.duals)
    cold = linear_assignment_batch(after)
    # few rows re-assigned, and no more shortest paths than the cold solve needed
    assert warm.rows[:, 0].sum() < cold.rows[:, 0].sum() / 4
    assert warm.rows[:, 1].sum() <= cold.rows[:, 1].sum()
    np.testing.assert_allclose(warm.value.numpy(), cold.value.numpy(), rtol=1e-12)


@needs_numba
def test_a_warm_start_from_an_unrelated_problem_is_dropped_for_a_cold_solve():
    # Independent random features at each evaluation: nothing to reuse. The old edges are far
    # from tight on the first rows already, so every pair is solved cold (and stays exact).
    gen = torch.Generator().manual_seed(0)
    cache = AssignmentCache()
    semantic_rsm(torch.randn(12, 16, 4, 4, generator=gen).relu(), warm_start=cache)
    x = torch.randn(12, 16, 4, 4, generator=gen).relu()
    warm = semantic_rsm(x, warm_start=cache)
    assert cache.stats["warm_pairs"] == cache.stats["warm_pairs_solved_cold"] == 66
    torch.testing.assert_close(warm, semantic_rsm(x), rtol=0, atol=1e-6)


@needs_numba
@pytest.mark.parametrize(
    "duals",
    [
        lambda rng, shape: 1e6 * rng.standard_normal(shape),
        lambda rng, shape: np.full(shape, np.nan),
        lambda rng, shape: np.where(rng.random(shape) < 0.5, np.inf, 0.0),
        lambda rng, shape: 1e300 * rng.standard_normal(shape),
        lambda rng, shape: np.zeros(shape),
    ],
)
@pytest.mark.parametrize("permutations", [False, True])
def test_warm_start_from_garbage_is_exact(duals, permutations):
    rng = np.random.default_rng(3)
    scores = _problems("normal", 30, 12, rng)
    if permutations:  # a well-formed start: its duals are repaired, not dropped
        assignment = np.stack([rng.permutation(12) for _ in range(30)])
    else:  # out of range and repeated columns
        assignment = rng.integers(-5, 20, scores.shape[:2])
    result = linear_assignment_batch(
        scores, assignment=assignment, duals=duals(rng, scores.shape[:2])
    )
    _check_optimal(scores, result)


def test_scipy_backend_gives_the_same_values():
    scores = _problems("relu", 20, 9, np.random.default_rng(4))
    result = linear_assignment_batch(scores, backend="scipy")
    _check_optimal(scores, result)
    assert np.isnan(result.duals.numpy()).all()
    if lap.HAVE_NUMBA:
        np.testing.assert_allclose(
            result.value.numpy(),
            linear_assignment_batch(scores).value.numpy(),
            rtol=1e-12,
            atol=1e-12,
        )


def test_torch_input_and_integer_scores():
    scores = torch.tensor([[[3, 1], [2, 0]]])
    assert linear_assignment_batch(scores).value.tolist() == [3.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(scores=np.zeros((3, 4))), ValueError, r"\(B, S, S\), but got shape \(3, 4\)"),
        (dict(scores=np.zeros((2, 3, 4))), ValueError, r"but got shape \(2, 3, 4\)"),
        (dict(scores=np.zeros((2, 0, 0))), ValueError, r"but got shape \(2, 0, 0\)"),
        (dict(scores=np.zeros((1, 2, 2), dtype=complex)), TypeError, "real dtype"),
        (dict(scores=np.full((1, 2, 2), np.nan)), ValueError, "4 NaN/Inf"),
        (dict(scores=np.zeros((1, 2, 2)), duals=np.zeros((1, 2))), ValueError, "assignment"),
        (
            dict(scores=np.zeros((1, 2, 2)), duals=np.zeros((1, 3)), assignment=np.zeros((1, 2))),
            ValueError,
            r"`duals` of shape \(1, 2\), but got shape \(1, 3\)",
        ),
        (dict(scores=np.zeros((1, 2, 2)), backend="lapjv"), ValueError, "'lapjv'"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_assignment_batch(**kwargs)


@needs_numba
def test_non_finite_scores_through_the_cache_path_raise():
    scores = np.zeros((2, 3, 3), dtype=np.float32)
    scores[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="1 matrices with NaN/Inf"):
        lap.solve_into(
            scores, np.arange(2), np.zeros(2, bool), np.zeros((2, 3), np.uint8), np.zeros((2, 3))
        )


# --- AssignmentCache and semantic_rsm(warm_start=...) -----------------------------------------


def _drifting(steps: int, shape: tuple[int, ...], rate: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    for _ in range(steps):
        yield x.relu()
        x = x + rate * torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_warm_rsm_equals_cold_rsm_across_drift(num_workers):
    cache = AssignmentCache()
    for step, x in enumerate(_drifting(4, (12, 8, 4, 4), 0.02)):
        warm = semantic_rsm(x, warm_start=cache, block_size=7, num_workers=num_workers)
        cold = semantic_rsm(x, block_size=7, num_workers=num_workers)
        assert (warm - cold).abs().max() <= 1e-6
        assert cache.stats["pairs"] == 66
        assert cache.stats["warm_pairs"] == (0 if step == 0 else 66) * lap.HAVE_NUMBA
    if lap.HAVE_NUMBA:  # the drift is small: most rows keep their assignment
        assert cache.stats["rows_reassigned"] < cache.stats["rows"] / 2


def test_warm_rsm_with_second_set_and_kernels():
    cache = AssignmentCache()
    gen = torch.Generator().manual_seed(5)
    y = torch.rand(5, 6, 9, generator=gen)
    for x in _drifting(3, (4, 6, 9), 0.05, seed=6):
        for kernel in ("cosine", "inner", "rbf"):
            warm = semantic_rsm(x, y, kernel=kernel, warm_start=cache)
            cold = semantic_rsm(x, y, kernel=kernel)
            torch.testing.assert_close(warm, cold, rtol=0, atol=1e-6)
    assert cache.nbytes == 4 * 5 * AssignmentCache.bytes_per_pair(6)


def test_cache_is_emptied_when_the_shapes_change():
    cache = AssignmentCache()
    x = torch.rand(6, 4, 9, generator=torch.Generator().manual_seed(7))
    semantic_rsm(x, warm_start=cache)
    semantic_rsm(x[:5], warm_start=cache)  # N changed
    assert cache.stats["warm_pairs"] == 0
    assert cache.nbytes == 10 * AssignmentCache.bytes_per_pair(4)
    semantic_rsm(x[:5, :3], warm_start=cache)  # S changed
    assert cache.stats["warm_pairs"] == 0
    semantic_rsm(x[:5, :3], x[:5, :3], warm_start=cache)  # symmetric -> two sets
    assert cache.stats["warm_pairs"] == 0
    assert cache.stats["pairs"] == 25
    torch.testing.assert_close(
        semantic_rsm(x[:5, :3], warm_start=cache), semantic_rsm(x[:5, :3]), rtol=0, atol=1e-6
    )
    cache.clear()
    assert cache.nbytes == 0


@needs_numba
def test_cap_solves_pairs_beyond_it_cold():
    per_pair = AssignmentCache.bytes_per_pair(16)
    cache = AssignmentCache(max_bytes=10 * per_pair + per_pair - 1)  # room for 10 pairs
    xs = list(_drifting(3, (8, 16, 5), 0.01, seed=8))
    for step, x in enumerate(xs):
        warm = semantic_rsm(x, warm_start=cache, block_size=4)
        torch.testing.assert_close(warm, semantic_rsm(x), rtol=0, atol=1e-6)
        assert cache.stats["warm_pairs"] == (0 if step == 0 else 10)
        assert cache.stats["pairs"] == 28
    assert cache.nbytes <= cache.max_bytes
    empty = AssignmentCache(max_bytes=0)  # keeps nothing: every call solves cold
    for x in xs:
        torch.testing.assert_close(semantic_rsm(x, warm_start=empty), semantic_rsm(x))
        assert (empty.nbytes, empty.stats["warm_pairs"], empty.stats["pairs"]) == (0, 0, 28)


def test_bytes_per_pair():
    assert AssignmentCache.bytes_per_pair(64) == 64 * (1 + 8) + 1
    assert AssignmentCache.bytes_per_pair(256) == 256 * 9 + 1
    assert AssignmentCache.bytes_per_pair(257) == 257 * (2 + 8) + 1


def test_large_positions_use_two_byte_assignments():
    cache = AssignmentCache()
    for x in _drifting(2, (3, 260, 2), 0.01, seed=9):
        torch.testing.assert_close(
            semantic_rsm(x, warm_start=cache), semantic_rsm(x), rtol=0, atol=1e-6
        )
    assert cache._assign.dtype == np.int16


def test_other_matchers_ignore_the_cache():
    cache = AssignmentCache()
    x = torch.rand(5, 4, 9, generator=torch.Generator().manual_seed(10))
    semantic_rsm(x, matcher="greedy", warm_start=cache)
    assert cache.stats["pairs"] == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_bytes=-1), ValueError, "non-negative int or None, but got -1"),
        (dict(max_bytes=1.5), ValueError, "but got 1.5"),
        (dict(max_bytes=True), ValueError, "but got True"),
    ],
)
def test_cache_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        AssignmentCache(**kwargs)


def test_semantic_rsm_rejects_a_wrong_warm_start():
    with pytest.raises(TypeError, match="AssignmentCache or None, but got dict"):
        semantic_rsm(torch.rand(3, 4, 5), warm_start={})


def test_scipy_fallback_without_numba(monkeypatch):
    xs = list(_drifting(3, (7, 9, 6), 0.02, seed=11))
    expected = [semantic_rsm(x) for x in xs]
    monkeypatch.setattr(lap, "HAVE_NUMBA", False)
    with pytest.raises(ValueError, match="numba to be importable"):
        linear_assignment_batch(np.zeros((1, 2, 2)), backend="numba")
    cache = AssignmentCache()
    for x, cold in zip(xs, expected, strict=True):
        torch.testing.assert_close(semantic_rsm(x, warm_start=cache), cold, rtol=0, atol=1e-6)
        assert cache.stats["warm_pairs"] == 0  # scipy has no duals: every solve is cold
        assert cache.stats["rows_reassigned"] == cache.stats["rows"]
    scores = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(12))
    value = match_exact(scores).value.numpy()
    np.testing.assert_allclose(value, optimal_values(scores.double().numpy()), rtol=1e-12)


def test_a_pickled_cache_keeps_its_cap_and_starts_cold():
    import pickle

    x = torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    cache = AssignmentCache(max_bytes=4096)
    semantic_rsm(x, warm_start=cache)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.max_bytes == 4096 and copy.nbytes == 0 and cache.nbytes > 0
    torch.testing.assert_close(semantic_rsm(x, warm_start=copy), semantic_rsm(x))


def _pair_optima(x: torch.Tensor) -> torch.Tensor:
    """Scipy's optimum of every pair i < j of concept vectors ``(N, S, C)``, and its scale."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    scores = torch.matmul(x[i], x[j].transpose(1, 2))
    return torch.from_numpy(optimal_values(scores)), scores.abs().flatten(1).amax(1)


@needs_numba
def test_warm_start_after_a_large_common_component_is_exact():
    # One channel constant at 3e7 at every position, then zero: the old duals (about -1e16) are
    # far larger than the new scores; a tolerance that grew with them kept wrong edges.
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 6, 4, 4, generator=gen, dtype=torch.float64).relu()
        first, later = x.clone(), x.clone()
        first[:, 0], later[:, 0] = 3e7, 0.0
        cache = AssignmentCache()
        semantic_rsm(first, warm_start=cache)
        warm = semantic_rsm(later, warm_start=cache)
        assert cache.stats["warm_pairs"] == 28
        torch.testing.assert_close(warm, semantic_rsm(later), rtol=0, atol=1e-12)


_STEPS = ("offset", "offset off", "scale", "flip", "ties", "zero", "back", "drift", "fresh")


def _step(kind: str, x: torch.Tensor, history: list, gen: torch.Generator) -> torch.Tensor:
    """One evaluation's features from the previous ones: how features change in a long run."""
    n = x.shape[0]
    pick = int(torch.randint(0, n, (1,), generator=gen))
    power = float(torch.empty(1).uniform_(-6, 6, generator=gen))
    if kind == "offset":  # one channel constant at every position, 1e6 to 1e8 times the rest
        x = x.clone()
        x[:, :, 0] = float(x.abs().max()) * 10 ** (7 + power / 6)
    elif kind == "offset off":
        x = x.clone()
        x[:, :, 0] = 0.0
    elif kind == "scale":
        x = x * 10**power
    elif kind == "flip":
        x = x.clone()
        x[pick] = -x[pick]
    elif kind == "ties":
        x = (x / x.abs().max().clamp_min(1e-300) * 2).round()
    elif kind == "zero":
        x = x.clone()
        x[pick] = 0.0
    elif kind == "back":
        x = history[int(torch.randint(0, len(history), (1,), generator=gen))]
    elif kind == "drift":  # every entry by about 1 %
        x = x * (1 + 0.01 * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    else:
        x = torch.randn(x.shape, generator=gen, dtype=x.dtype).relu() * 10**power
    return x


@needs_numba
@pytest.mark.parametrize("seed", range(24))
def test_warm_starts_over_random_sequences_of_evaluations_match_scipy(seed):
    gen = torch.Generator().manual_seed(seed)
    size = (1, 2, 3, 5, 9, 16)[seed % 6]
    x = torch.randn(5, size, 3, generator=gen, dtype=torch.float64).relu()
    cache = AssignmentCache()
    history = [x]
    kind = ("fresh", "offset")[seed % 2]  # the first, cold, evaluation: huge duals or not
    for step in range(16):
        # a common component comes and goes: "offset off" follows "offset" every other time
        if step == 0:
            pass
        elif kind != "offset" or bool(torch.randint(0, 2, (1,), generator=gen)):
            kind = _STEPS[int(torch.randint(0, len(_STEPS), (1,), generator=gen))]
        else:
            kind = "offset off"
        x = _step(kind, x, history, gen)
        history.append(x)
        rsm = semantic_rsm(x, kernel="inner", warm_start=cache)
        i, j = torch.triu_indices(5, 5, offset=1)
        optimum, scale = _pair_optima(x)
        error = (rsm[i, j] - optimum).abs()
        assert (error <= 1e-12 * size * scale).all(), (kind, error.max())


@needs_numba
def test_the_certificate_accepts_optimal_solutions_and_rejects_others():
    rng = np.random.default_rng(5)
    scores = _problems("normal", 20, 12, rng) * 1e-8
    result = linear_assignment_batch(scores)
    scratch = np.empty(12)
    for cost, x, v in zip(scores, result.permutation.numpy(), result.duals.numpy(), strict=True):
        y = np.argsort(x)
        assert _certified(cost, x, y, v, scratch)
        worse = x.copy()
        worse[[0, 1]] = worse[[1, 0]]  # any other permutation leaves an edge far from tight
        if cost[np.arange(12), worse].sum() < cost[np.arange(12), x].sum() - 1e-20:
            assert not _certified(cost, worse, np.argsort(worse), v, scratch)
        assert not _certified(cost, x, y, v + 1e3 * np.arange(12), scratch)  # duals far off
        better = cost.copy()  # one entry off the assignment now gains more than the optimum
        better[0, x[1]] = cost[0, x[0]] + cost[1, x[1]] + np.abs(cost).max()
        assert not _certified(better, x, y, v, scratch)


@needs_numba
def test_the_certificate_takes_its_tolerance_from_all_scores():
    # Assigned scores near 1, every other score about -1e6: the duals spread over 1e6, far more
    # than the assigned scores' scale; the full max |score| admits them.
    rng = np.random.default_rng(0)
    cost = -1e6 * rng.uniform(1, 2, (1, 8, 8))
    cost[0, np.arange(8), np.arange(8)] = rng.uniform(0.5, 1, 8)
    result = linear_assignment_batch(cost)
    x = result.permutation[0].numpy()
    assert (x == np.arange(8)).all()
    assert _certified(cost[0], x, np.argsort(x), result.duals[0].numpy(), np.empty(8))
