"""semantic_rsm against the straightforward per-pair loop, and against the floor.

Run: ``python benchmarks/bench_semantic_rsm.py [--n 200] [--memory]``

* loop: what the paper's reference code does; a Python loop over the N(N+1)/2 pairs, each
  forming its S x S cost matrix, solving it with scipy and applying the cosine kernel to a
  permuted copy of the features. Written fresh here.
* ours: ``semantic_rsm(x, kernel="cosine", matcher="exact")`` with default settings (a
  thread per core), and with ``num_workers=1`` (one thread) to separate the single-thread
  cost from the threads' scaling.
* floor: the same LAPs solved alone on precomputed cost matrices, plus the batched matmul that
  forms them, divided by the number of cores: no implementation that solves every LAP with
  scipy can beat it.

All three run side by side in one process on the same features; ratios are of wall time.
``--memory`` also runs N=2000, S=49, C=256 in a child process and prints its peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _features import random_relu_features, trained_cnn_features  # noqa: E402

from lightning_rsm.functional import semantic_rsm  # noqa: E402


def loop_rsm(x: torch.Tensor) -> np.ndarray:
    """Cosine semantic RSM, one pair at a time, permuted copies included."""
    n, c = x.shape[:2]
    z = x.reshape(n, c, -1).transpose(1, 2).numpy().astype(np.float64)
    k = np.eye(n)
    for i in range(n):
        for j in range(i, n):
            rows, cols = linear_sum_assignment(z[i] @ z[j].T, maximize=True)
            a, b = z[i][rows].ravel(), z[j][cols].ravel()
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            k[i, j] = k[j, i] = a @ b / denom if denom > 0 else 0.0
    return k


def floor_seconds(x: torch.Tensor, cores: int) -> tuple[float, float]:
    """(LAP seconds, matmul seconds) for all pairs i < j, LAPs on precomputed matrices."""
    n, c = x.shape[:2]
    z = x.reshape(n, c, -1).transpose(1, 2).contiguous()
    lap = matmul = 0.0
    with torch.no_grad():
        for i in range(n - 1):
            start = time.perf_counter()
            scores = torch.matmul(z[i], z[i + 1 :].transpose(1, 2))
            matmul += time.perf_counter() - start
            block = scores.double().numpy()
            start = time.perf_counter()
            for matrix in block:
                linear_sum_assignment(matrix, maximize=True)
            lap += time.perf_counter() - start
    return lap / cores, matmul / cores


def bench(name: str, x: torch.Tensor, cores: int) -> str:
    n, s = x.shape[0], x.shape[2] * x.shape[3]
    pairs_loop, pairs_ours = n * (n + 1) // 2, n * (n - 1) // 2
    start = time.perf_counter()
    expected = loop_rsm(x)
    t_loop = time.perf_counter() - start
    start = time.perf_counter()
    ours = semantic_rsm(x).double().numpy()
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    semantic_rsm(x, num_workers=1)
    t_one = time.perf_counter() - start
    t_lap, t_mm = floor_seconds(x, cores)
    t_floor = t_lap + t_mm
    err = float(np.abs(ours - expected).max())
    return (
        f"| {name} | {s} | {1e6 * t_loop / pairs_loop:.0f} | {1e6 * t_ours / pairs_ours:.1f} "
        f"| {1e6 * t_one / pairs_ours:.1f} "
        f"| {1e6 * t_floor / pairs_ours:.1f} ({1e6 * t_mm / pairs_ours:.1f} matmul) "
        f"| {t_loop / t_ours:.2f}x | {t_ours / t_floor:.2f}x | {t_one / t_floor / cores:.2f}x "
        f"| {err:.1e} |"
    )


def peak_memory_child(n: int) -> None:
    x = torch.randn(n, 256, 7, 7, generator=torch.Generator().manual_seed(0)).relu()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    semantic_rsm(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"N={n}, S=49, C=256: {seconds:.1f} s, peak RSS {peak / 2**20:.2f} GiB "
        f"(features and imports alone {before / 2**20:.2f} GiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="probe count (default 200)")
    parser.add_argument("--memory", action="store_true", help="also measure N=2000 peak RSS")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return
    cores = len(os.sched_getaffinity(0))
    print(
        f"# {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}"
    )
    print(f"# N = {args.n}, C = 256, cosine kernel, exact matcher; times in us per pair")
    print(
        "| features | S | loop | semantic_rsm | 1 thread | floor | loop / ours | ours / floor "
        "| 1 thread / (floor x cores) | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    cnn = trained_cnn_features(args.n)
    for side in (7, 14):
        print(bench("random ReLU", random_relu_features(args.n, side), cores), flush=True)
        trained = cnn["block3"] if side == 7 else cnn["block2"]
        print(bench("trained CNN", trained, cores), flush=True)
    if args.memory:
        subprocess.run([sys.executable, __file__, "--memory-child", "2000"], check=True)


if __name__ == "__main__":
    main()
