"""The four matchers side by side: time per pair, certified gap, true error and retrieval mAP.

Run: ``python benchmarks/bench_matchers.py [--n49 300] [--n196 100] [--device cpu]``

For each feature set and size, ``semantic_rsm(x, kernel="cosine", matcher=m, return_gap=True)``
runs with ``m`` in exact, windowed, greedy and auction, one after the other in this process on
the same features. Columns: microseconds per pair (``N (N - 1) / 2`` pairs) and the ratio to
exact in the same run; the largest certified gap ``max(gap)`` (a bound on ``|K - K_exact|``
from each matcher's own upper bound, exact has 0); the largest true error ``max |K - K_exact|``;
and, for the trained CNN, the retrieval mAP (same digit = relevant) of the RSM.

Feature sets (from ``_features.py``): ``cnn``, a small CNN trained briefly on sklearn digits
upscaled onto a 28 x 28 canvas (``block3``: 7 x 7 x 256, S = 49; ``block2``: 14 x 14 x 256,
S = 196), and ``relu``, standard normal maps with 256 channels passed through ReLU.
The auction's tolerance is ``--tol`` on the cosine scale, so its gap is at most that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _features import random_relu_features, trained_cnn_features  # noqa: E402

from lightning_rsm.functional import retrieval_average_precision, semantic_rsm  # noqa: E402

MATCHERS = ("exact", "windowed", "greedy", "auction")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    name: str, x: torch.Tensor, labels: torch.Tensor | None, device: torch.device, tol: float
) -> None:
    """Print one table row per matcher for features ``x`` (N, C, H, W)."""
    n, size = x.shape[0], x.shape[2] * x.shape[3]
    pairs = n * (n - 1) // 2
    exact = seconds_exact = None
    for matcher in MATCHERS:
        on = device if matcher in ("greedy", "auction") else torch.device("cpu")
        features = x.to(on)
        _sync(on)
        start = time.perf_counter()
        rsm, gap = semantic_rsm(
            features, kernel="cosine", matcher=matcher, return_gap=True, tol=tol
        )
        _sync(on)
        seconds = time.perf_counter() - start
        rsm, gap = rsm.cpu().double(), gap.cpu().double()
        if matcher == "exact":
            exact, seconds_exact = rsm, seconds
        error = (rsm - exact).abs().max().item()
        quality = (
            f"{retrieval_average_precision(rsm, labels).item():.4f}" if labels is not None else "-"
        )
        print(
            f"| {name} | {n} | {size} | {matcher} ({on.type}) | {seconds / pairs * 1e6:.1f} |"
            f" {seconds / seconds_exact:.2f} | {gap.max().item():.1e} | {error:.1e} | {quality} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n49", type=int, default=300, help="samples at S = 49")
    parser.add_argument("--n196", type=int, default=100, help="samples at S = 196")
    parser.add_argument("--tol", type=float, default=1e-4, help="auction tolerance (cosine)")
    parser.add_argument("--device", default="cpu", help="where greedy and auction run")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    print("| features | N | S | matcher | us/pair | vs exact | max gap | max error | mAP |")
    print("|---|---|---|---|---|---|---|---|---|")
    cnn = trained_cnn_features(max(args.n49, args.n196))
    for key, n, side in (("block3", args.n49, 7), ("block2", args.n196, 14)):
        compare(f"cnn {key}", cnn[key][:n], cnn["labels"][:n], device, args.tol)
        compare("relu", random_relu_features(n, side), None, device, args.tol)


if __name__ == "__main__":
    main()
