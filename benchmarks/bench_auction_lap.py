"""Per-LAP cost of the batched auction against scipy's exact solver, on the same matrices.

Score matrices are those ``semantic_rsm`` forms: inner products of the concept vectors of
random ReLU feature maps (``(B, S, S)``, C channels). The auction solves the whole batch at
once with cosine tolerance ``--tol`` (raw tolerance ``tol * |X_i| * |X_j|``); scipy solves them
one by one. Both run in this process on one CPU thread by default (scipy's solver is
single-threaded), so the ratio is per core.

Usage::

    python benchmarks/bench_auction_lap.py                 # S = 49 (B = 2000), S = 196 (B = 500)
    python benchmarks/bench_auction_lap.py --batch 200     # quicker
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lightning_rsm.functional.matching.auction import auction_assignment


def _scores(batch: int, size: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` score matrices of random sample pairs and their ``|X_i| * |X_j|``."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(2 * batch, size, channels, generator=gen).relu()
    left, right = feats[:batch], feats[batch:]
    scores = torch.bmm(left, right.transpose(1, 2))
    scale = left.double().flatten(1).norm(dim=1) * right.double().flatten(1).norm(dim=1)
    return scores, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="LAPs per size")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tol {args.tol:g}")
    print("   S      B   scipy us/LAP  auction us/LAP  auction/scipy  max gap/tol  max value err")
    for size, default_batch in ((49, 2000), (196, 500)):
        batch = args.batch or default_batch
        scores, scale = _scores(batch, size, args.channels, seed=size)
        start = time.perf_counter()
        result = auction_assignment(scores, tol=args.tol * scale)
        auction_s = time.perf_counter() - start
        value, upper = result.value, result.upper
        matrices = scores.double().numpy()
        start = time.perf_counter()
        exact = np.array([m[linear_sum_assignment(m, maximize=True)].sum() for m in matrices])
        scipy_s = time.perf_counter() - start
        exact_t = torch.from_numpy(exact)
        assert bool(
            (value <= exact_t + 1e-9 * scale).all() & (upper >= exact_t - 1e-9 * scale).all()
        )
        print(
            f"{size:4d} {batch:6d} {scipy_s / batch * 1e6:14.1f} {auction_s / batch * 1e6:15.1f}"
            f" {auction_s / scipy_s:14.2f} {((upper - value) / (args.tol * scale)).max():12.3f}"
            f" {((exact_t - value) / scale).max():14.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
