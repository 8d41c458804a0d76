"""One prepared check of the auction matcher on a CUDA machine (runs scaled down anywhere).

For each size it computes the semantic cosine RSM of random ReLU feature maps with
``matcher="auction"`` on the GPU (features, cost blocks and the auction all stay on the device),
times it, and checks it against the exact CPU path (scipy) on the first ``--check`` samples:
every exact entry must lie inside the certified interval ``[rsm, rsm + gap]`` (up to float32
output rounding) and every gap must be at most the tolerance. Then it fits a small CNN with
``RSMMonitor(matcher="auction")`` on the device three times (no monitor, synchronous,
``background=True``: the worker's auction runs on a CUDA stream of its own), prints each fit's
seconds, and checks that both monitored histories agree within the tolerance. Exit status 1 if
a check fails.

Usage::

    python benchmarks/gpu_check.py             # CUDA: N=5000, S=49 and N=1000, S=196
    python benchmarks/gpu_check.py --small     # scaled down (N=120, S=49 and N=40, S=196)
    python benchmarks/gpu_check.py --device cpu --small
    python benchmarks/gpu_check.py --skip-monitor  # the auction check only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_rsm.functional import semantic_rsm  # noqa: E402

MONITOR_LAYERS = ["block1", "block2", "block3"]

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


def fit_monitored(mode: str, device: torch.device, probe_size: int, epochs: int, tol: float):
    """Seconds of a fit of DigitsCNN on ``device`` with no monitor, a synchronous one or a
    background one (auction, every epoch), and the monitor's history."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_rsm import RSMMonitor
    from lightning_rsm.demo import DigitsCNN, shifted_digits

    images, labels = shifted_digits()
    probe = (images[:probe_size], labels[:probe_size])
    train = DataLoader(TensorDataset(images[probe_size:], labels[probe_size:]), batch_size=64)
    callbacks = []
    if mode != "none":
        callbacks.append(
            RSMMonitor(
                probe,
                MONITOR_LAYERS,
                matcher="auction",
                tol=tol,
                background=mode == "background",
                log_images=False,
            )
        )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN(width=32), train)
    _sync(device)
    return time.perf_counter() - start, (callbacks[0].history if callbacks else [])


def check_background_monitor(device: torch.device, small: bool, tol: float) -> bool:
    """No monitor, synchronous, background: fit seconds; the two histories agree within tol."""
    probe_size, epochs = (60, 2) if small else (1000, 4)
    seconds, histories = {}, {}
    for mode in ("none", "sync", "background"):
        seconds[mode], histories[mode] = fit_monitored(mode, device, probe_size, epochs, tol)
    sync, background = histories["sync"], histories["background"]
    same_rows = [(r["epoch"], r["step"]) for r in sync] == [
        (r["epoch"], r["step"]) for r in background
    ]
    pairs = zip(sync, background, strict=True) if same_rows else []
    diffs = [abs(a[k] - b[k]) for a, b in pairs for k in a if k != "rsm/time_s"]
    diff = max((d for d in diffs if not math.isnan(d)), default=0.0)
    ok = same_rows and len(sync) == epochs and diff <= 10 * tol
    print(
        f"monitor (auction, probe {probe_size}, {epochs} epochs) on {device.type}: fit "
        + ", ".join(f"{mode} {s:.1f} s" for mode, s in seconds.items())
        + f" | background adds {100 * (seconds['background'] / seconds['none'] - 1):+.0f}%, "
        f"synchronous {100 * (seconds['sync'] / seconds['none'] - 1):+.0f}% | max |score diff| "
        f"{diff:.1e} | {'OK' if ok else 'FAIL'}",
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
    parser.add_argument("--skip-monitor", action="store_true", help="no RSMMonitor fits")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}, {torch.get_num_threads()} CPU threads", flush=True)
    sizes = SMALL if args.small or device.type != "cuda" else FULL
    ok = [check(n, side, args.channels, args.check, args.tol, device) for n, side in sizes]
    if not args.skip_monitor:
        small = args.small or device.type != "cuda"
        ok.append(check_background_monitor(device, small, args.tol))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
