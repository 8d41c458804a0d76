"""What RSMMonitor adds to the wall time of a fit: none, synchronous, and ``background=True``.

Run: ``python benchmarks/bench_monitor_overhead.py [--epochs 12] [--probe 150] [--repeats 3]``

A GPU host simulated on a CPU: training runs on one torch thread (as a GPU-bound loop leaves the
host's cores idle) and the monitor's solver uses one thread (``solver_threads=1``), which with
``background=True`` runs on the other core. :class:`~lightning_rsm.demo.DigitsCNN` trains on the
shifted digits; the probe is ``--probe`` images, the layers its three blocks (S = 64, 64, 16
after pooling), exact cosine RSMs every epoch. The three fits run side by side, in turn, each
``--repeats`` times; the table gives the median fit time and the range, and the overhead of
each median against the median without the monitor. Both monitored runs must give the same
history (bit for bit, but for ``rsm/time_s``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_rsm import RSMMonitor  # noqa: E402
from lightning_rsm.demo import DigitsCNN, shifted_digits  # noqa: E402

LAYERS = ["block1", "block2", "block3"]
MODES = ("none", "sync", "background")


def fit(mode: str, epochs: int, probe_size: int, width: int) -> tuple[float, list[dict]]:
    """Seconds of ``trainer.fit`` and the monitor's history (empty without one)."""
    images, labels = shifted_digits()
    probe = (images[:probe_size], labels[:probe_size])
    train = DataLoader(TensorDataset(images[probe_size:], labels[probe_size:]), batch_size=64)
    callbacks = []
    if mode != "none":
        monitor = RSMMonitor(
            probe, LAYERS, solver_threads=1, background=mode == "background", log_images=False
        )
        callbacks.append(monitor)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DigitsCNN(width=width)
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    return seconds, (callbacks[0].history if callbacks else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--probe", type=int, default=150, help="probe images")
    parser.add_argument("--width", type=int, default=16, help="DigitsCNN width")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    histories: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            seconds, history = fit(mode, args.epochs, args.probe, args.width)
            times[mode].append(seconds)
            histories[mode] = [{k: v for k, v in r.items() if k != "rsm/time_s"} for r in history]
            print(f"  {mode:10s} {seconds:7.1f} s", flush=True)
    evaluation_s = statistics.median(
        row["rsm/time_s"] for row in fit("sync", 1, args.probe, args.width)[1]
    )
    base = statistics.median(times["none"])
    print(
        f"# {args.epochs} epochs, probe {args.probe}, layers {LAYERS}, exact cosine, every epoch; "
        f"training on 1 torch thread, solver_threads=1; {os.cpu_count()} cores; one evaluation "
        f"~{evaluation_s:.1f} s"
    )
    print("| monitor | fit seconds (median) | range | added to training |")
    print("|---|---|---|---|")
    for mode in MODES:
        median = statistics.median(times[mode])
        spread = f"{min(times[mode]):.1f}-{max(times[mode]):.1f}"
        print(f"| {mode} | {median:.1f} | {spread} | {100 * (median / base - 1):+.0f}% |")
    same = histories["sync"] == histories["background"]
    print(f"background history equals synchronous history (bit for bit): {same}")


if __name__ == "__main__":
    main()
