"""Keep every RSM of two training runs and compare the runs layer by layer.

What it shows:
- ``RSMMonitor(save_rsms=True)``: each evaluation's RSMs (every layer, semantic and baseline)
  kept in ``<log_dir>/rsms/``, with the probe's labels, its fingerprint and sample ids (here the
  images' indices in the data set);
- two runs that differ only in their seed (weights, batch order) on the same probe;
- ``compare_runs``: how similar each layer of one run is to each layer of the other (CKA of
  their last RSMs), printed as a table and drawn as a labelled heatmap, the figure that
  model-vs-model studies show. The same from a shell:
  ``lightning-rsm compare runs/compare_runs/seed0 runs/compare_runs/seed1 -o seeds.png``.

Run:  python examples/compare_runs.py --epochs 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor, compare_runs, load_rsms
from lightning_rsm.demo import DEMO_LAYERS, DigitsCNN, shifted_digits, split_probe
from lightning_rsm.run_comparison import comparison_figure


def train(seed: int, log_dir: Path, *, epochs: int, per_class: int, train_size: int) -> Path:
    """One run of the demo CNN, its RSMs kept; returns its log dir. The data and the probe
    are the same for every seed (split with seed 0); the weights and batch order are not."""
    images, labels = shifted_digits(seed=0)
    probe_idx, train_idx = split_probe(labels, per_class, seed=0)
    train_idx = train_idx[:train_size]
    pl.seed_everything(seed)
    train_loader = DataLoader(
        TensorDataset(images[train_idx], labels[train_idx]), batch_size=32, shuffle=True
    )
    monitor = RSMMonitor(
        (images[probe_idx], labels[probe_idx]),
        list(DEMO_LAYERS),
        max_positions=16,
        save_rsms=True,  # -> <log_dir>/rsms/step=<step>.pt, one file per evaluation
        probe_ids=probe_idx.tolist(),  # which images the probe holds, stored with the RSMs
        log_images=False,
    )
    logger = TensorBoardLogger(log_dir, name=f"seed{seed}", version="")  # one folder per run
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsCNN(width=8), train_loader)
    return Path(logger.log_dir)


def main(
    *,
    epochs: int = 3,
    per_class: int = 6,
    train_size: int = 600,
    log_dir: str = "runs/compare_runs",
    figure: str = "runs/compare_runs/seed0_vs_seed1.png",
) -> object:
    runs = [
        train(seed, Path(log_dir), epochs=epochs, per_class=per_class, train_size=train_size)
        for seed in (0, 1)
    ]
    evaluations = load_rsms(runs[0])
    print(f"{runs[0]}: {len(evaluations)} evaluations at steps {[e.step for e in evaluations]}")
    result = compare_runs(runs[0], runs[1], method="cka")  # the last evaluation of each run
    print(result.table("seed 0", "seed 1"))
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    comparison_figure(result, "seed 0", "seed 1").savefig(figure, dpi=120)
    print(f"Figure: {figure}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=6, help="probe images per digit")
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--log-dir", default="runs/compare_runs")
    args = parser.parse_args()
    main(
        epochs=args.epochs,
        per_class=args.per_class,
        train_size=args.train_size,
        log_dir=args.log_dir,
        figure=str(Path(args.log_dir) / "seed0_vs_seed1.png"),
    )
