"""What drawing the figures costs an evaluation of RSMMonitor, on the demo.

Run: ``python benchmarks/bench_monitor_rendering.py [--epochs 4] [--per-class 12] [--repeats 2]``

The demo's setting (:mod:`lightning_rsm.demo`: DigitsCNN on shifted digits, a probe of
``10 * per_class`` images, layers block1-3, ``max_positions=64``, exact cosine RSMs after every
epoch, a ``CSVLogger`` that gets the PNGs), fitted with ``log_images=True`` and ``False`` in turn,
``--repeats`` times each. Per evaluation: the monitor's ``rsm/time_s`` (capture, RSMs and scores;
the first evaluation, with numba's compilation, left out), the seconds of
``Evaluator.render`` (drawing the heatmaps, layer RSA and neighbours and rendering them to RGB,
timed by wrapping it here) and the fit's wall time with images against without them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_rsm import RSMMonitor  # noqa: E402
from lightning_rsm.callbacks.evaluation import Evaluator  # noqa: E402
from lightning_rsm.demo import DEMO_LAYERS, DigitsCNN, shifted_digits, split_probe  # noqa: E402

RENDERS: list[float] = []
_render = Evaluator.render


def _timed_render(self: Evaluator, outcome: Any) -> Any:
    start = time.perf_counter()
    result = _render(self, outcome)
    RENDERS.append(time.perf_counter() - start)
    return result


Evaluator.render = _timed_render


def fit(log_images: bool, epochs: int, per_class: int, folder: str) -> tuple[float, list[float]]:
    """Seconds of ``trainer.fit`` and the ``rsm/time_s`` of every evaluation but the first."""
    pl.seed_everything(0)
    images, labels = shifted_digits(seed=0)
    probe_idx, train_idx = split_probe(labels, per_class, seed=0)
    train_idx = train_idx[:600]
    train = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), 32, shuffle=True)
    monitor = RSMMonitor(
        (images[probe_idx], labels[probe_idx]),
        list(DEMO_LAYERS),
        max_positions=64,
        log_images=log_images,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(folder, name=f"images={log_images}"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN(width=16), train)
    return time.perf_counter() - start, [row["rsm/time_s"] for row in monitor.history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    fits: dict[bool, list[float]] = {True: [], False: []}
    evaluations: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        fit(False, 1, args.per_class, folder)  # warm-up: numba, matplotlib fonts
        RENDERS.clear()
        for _ in range(args.repeats):
            for log_images in (True, False):
                seconds, times = fit(log_images, args.epochs, args.per_class, folder)
                fits[log_images].append(seconds)
                evaluations[log_images] += times
    render = statistics.median(RENDERS)
    evaluation = statistics.median(evaluations[True])
    print(f"N = {10 * args.per_class}, {len(DEMO_LAYERS)} layers, {args.epochs} epochs")
    print("| rsm/time_s (images on / off) | render per evaluation | render share | fit on / off |")
    print("|---|---|---|---|")
    print(
        f"| {evaluation:.2f} s / {statistics.median(evaluations[False]):.2f} s "
        f"| {render:.2f} s | {render / (evaluation + render):.0%} "
        f"| {statistics.median(fits[True]):.1f} s / {statistics.median(fits[False]):.1f} s |"
    )


if __name__ == "__main__":
    main()
