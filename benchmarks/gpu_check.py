"""One prepared check of the auction matcher on a CUDA machine (runs scaled down anywhere).

For each size it computes the semantic cosine RSM of random ReLU feature maps with
``matcher="auction"`` on the GPU (features, cost blocks and the auction all stay on the device),
times it, and checks it against the exact CPU path (scipy) on the first ``--check`` samples:
every exact entry must lie inside the certified interval ``[rsm, rsm + gap]`` (up to float32
output rounding) and every gap must be at most the tolerance. Exit status 1 if a check fails.

Usage::

    python benchmarks/gpu_check.py             # CUDA: N=5000, S=49 and N=1000, S=196
    python benchmarks/gpu_check.py --small     # scaled down (N=120, S=49 and N=40, S=196)
    python benchmarks/gpu_check.py --device cpu --small
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_rsm.functional import semantic_rsm  # noqa: E402

FULL = [(5000, 7), (1000, 14)]  # (N, side): S = 49 and S = 196
SMALL = [(120, 7), (40, 14)]
SLACK = 1e-5  # float32 output rounding and CPU/GPU matmul differences


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(n: int, side: int, channels: int, n_check: int, tol: float, device: torch.device):
    gen = torch.Generator().manual_seed(n + side)
    x = torch.randn(n, channels, side, side, generator=gen).relu()
    size = side * side
    x_dev = x.to(device)
    semantic_rsm(x_dev[:4], matcher="auction", tol=tol)  # warm-up: CUDA context, kernels
    _sync(device)
    start = time.perf_counter()
    rsm, gap = semantic_rsm(x_dev, matcher="auction", tol=tol, return_gap=True)
    _sync(device)
    seconds = time.perf_counter() - start
    pairs = n * (n - 1) // 2
    m = min(n, n_check)
    start = time.perf_counter()
    exact = semantic_rsm(x[:m], matcher="exact")
    exact_seconds = time.perf_counter() - start
    sub, sub_gap = rsm[:m, :m].cpu().double(), gap[:m, :m].cpu().double()
    exact = exact.double()
    outside = ((exact < sub - SLACK) | (exact > sub + sub_gap + SLACK)).sum().item()
    max_gap = gap.max().item()
    ok = outside == 0 and max_gap <= tol
    diff = (sub - exact).abs().max().item()
    exact_us = exact_seconds / (m * (m - 1) / 2) * 1e6
    print(
        f"N={n:5d} S={size:3d} {device.type}: {seconds:8.2f} s, "
        f"{seconds / pairs * 1e6:8.2f} us/pair | "
        f"max certified gap {max_gap:.2e} (tol {tol:.0e}) | vs exact CPU on {m} samples: "
        f"max |diff| {diff:.2e}, {outside} entries outside the certificate, "
        f"exact {exact_us:.1f} us/pair | {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="scaled-down sizes")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--check", type=int, default=200, help="samples compared with exact")
    parser.add_argument("--tol", type=float, default=1e-4, help="certified cosine tolerance")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU threads", flush=True)
    sizes = SMALL if args.small or device.type != "cuda" else FULL
    ok = [check(n, side, args.channels, args.check, args.tol, device) for n, side in sizes]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
