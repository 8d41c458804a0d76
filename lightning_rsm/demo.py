"""The demo: a small CNN on shifted scikit-learn digits, monitored with :class:`RSMMonitor`.

scikit-learn's 8 x 8 digits (shipped with the package, so nothing is downloaded) are upscaled
and pasted onto a larger canvas at a random offset per image. Spatial alignment between two
probe images therefore cannot be relied on: a baseline RSM that compares feature maps position
by position suffers, while the semantic (permutation-invariant) RSM does not.

Run it with ``lightning-rsm demo`` (or ``make demo``).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DEMO_LAYERS = ("block1", "block2", "block3")


def shifted_digits(*, canvas: int = 32, scale: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """All 1797 scikit-learn digits, upscaled and pasted at a random offset each.

    Args:
        canvas: side of the square output images, at least ``8 * scale``.
        scale: upscaling factor of the 8 x 8 digits (bilinear).
        seed: seed of the offsets; the same seed gives the same images.

    Returns:
        images of shape ``(1797, 1, canvas, canvas)`` with values in ``[0, 1]``, and labels of
        shape ``(1797,)`` (int64, 0 to 9).

    Raises:
        ValueError: If ``scale`` is not a positive int or ``canvas`` is smaller than ``8 * scale``.

    Example:
        >>> images, labels = shifted_digits(canvas=24, scale=2)
        >>> images.shape, labels.shape
        (torch.Size([1797, 1, 24, 24]), torch.Size([1797]))
        >>> float(images.min()), float(images.max())
        (0.0, 1.0)
    """
    if not (isinstance(scale, int) and scale > 0):
        raise ValueError(f"Expected `scale` to be a positive int, but got {scale!r}.")
    if not (isinstance(canvas, int) and canvas >= 8 * scale):
        raise ValueError(
            f"Expected `canvas` to be an int of at least 8 * scale = {8 * scale}, "
            f"but got {canvas!r}."
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, scale_factor=scale, mode="bilinear", align_corners=False)
    big = big.clamp(0.0, 1.0)
    side = big.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, canvas - side + 1, (big.shape[0], 2), generator=generator)
    images = torch.zeros(big.shape[0], 1, canvas, canvas)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        images[i, :, dy : dy + side, dx : dx + side] = big[i]
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def split_probe(labels: Tensor, per_class: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of a class-balanced probe set and of the remaining (training) samples.

    Args:
        labels: int tensor of shape ``(N,)``.
        per_class: probe samples drawn from each class.
        seed: seed of the draw.

    Returns:
        ``(probe_idx, train_idx)``: disjoint int64 tensors; the probe is sorted by label.

    Raises:
        ValueError: If a class has fewer than ``per_class + 1`` samples.

    Example:
        >>> probe, train = split_probe(torch.tensor([0, 0, 0, 1, 1, 1]), 1)
        >>> len(probe), len(train)
        (2, 4)
    """
    generator = torch.Generator().manual_seed(seed)
    probe = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(
                f"Expected every class to hold more than `per_class` = {per_class} samples, "
                f"but got {len(idx)} for class {c}."
            )
        probe.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]].sort().values)
    probe_idx = torch.cat(probe)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[probe_idx] = False
    return probe_idx, mask.nonzero().flatten()


class DigitsCNN(pl.LightningModule):
    """Three conv blocks (conv, batch norm, ReLU, max pool) and a linear head.

    The blocks are the monitored layers.

    On a 32 x 32 input, ``block1``, ``block2`` and ``block3`` output feature maps of
    16 x 16, 8 x 8 and 4 x 4 positions; ``head`` outputs 10 logits.

    Args:
        width: channels of the first block (doubled in each following block).
        lr: Adam learning rate.

    Example:
        >>> model = DigitsCNN(width=4)
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.block1 = block(1, width)
        self.block2 = block(width, 2 * width)
        self.block3 = block(2 * width, 4 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block3(self.block2(self.block1(x))))

    def _step(self, batch: Sequence[Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def format_table(history: Sequence[dict[str, float]], layers: Sequence[str]) -> str:
    """Render an :class:`RSMMonitor` history as a plain-text table, one row per epoch and layer.

    Args:
        history: ``RSMMonitor.history``: one dict of scores per evaluation.
        layers: the monitored layer names.

    Returns:
        the table as a string (columns: epoch, layer, semantic mAP, baseline mAP, their
        probability agreements); a score that was not computed shows as ``-``.

    Example:
        >>> row = {"epoch": 0, "rsm/a/semantic/map": 0.5, "rsm/a/baseline/map": 0.25}
        >>> print(format_table([row], ["a"]))
        epoch  layer  sem mAP  base mAP  sem agree  base agree
            0  a        0.500     0.250          -           -
    """
    width = max(5, *(len(layer) for layer in layers))
    columns = ("sem mAP", "base mAP", "sem agree", "base agree")
    keys = (
        "semantic/map",
        "baseline/map",
        "semantic/probability_agreement",
        "baseline/probability_agreement",
    )
    lines = [f"epoch  {'layer':<{width}}  " + "  ".join(columns)]
    for row in history:
        for layer in layers:
            cells = []
            for column, key in zip(columns, keys, strict=True):
                value = row.get(f"rsm/{layer}/{key}")
                text = "-" if value is None or math.isnan(value) else f"{value:.3f}"
                cells.append(f"{text:>{len(column)}}")
            lines.append(f"{row['epoch']:>5}  {layer:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _seed_quietly(seed: int) -> None:
    """``seed_everything`` without its log line where Lightning has ``verbose`` (not 2.1-2.2)."""
    quiet = "verbose" in inspect.signature(pl.seed_everything).parameters
    pl.seed_everything(seed, **({"verbose": False} if quiet else {}))


def run_demo(
    *,
    log_dir: str | Path = "runs/demo",
    epochs: int = 3,
    per_class: int = 12,
    train_size: int | None = None,
    width: int = 16,
    seed: int = 0,
    matcher: str = "exact",
    max_positions: int | None = 64,
    enable_progress_bar: bool = False,
) -> list[dict[str, float]]:
    """Train :class:`DigitsCNN` on shifted digits with an :class:`RSMMonitor` and print a table.

    Args:
        log_dir: folder of the TensorBoard logs (``tensorboard --logdir <log_dir>``).
        epochs: training epochs; the RSMs are evaluated after each.
        per_class: probe samples per class (the probe holds ``10 * per_class`` images).
        train_size: train on only this many of the remaining images (for a quick try).
        width: channels of the first conv block.
        seed: seed of the data, the split and the weights.
        matcher: the LAP solver of the semantic RSM.
        max_positions: cap on the spatial positions per feature map (adaptive average pooling).
        enable_progress_bar: show Lightning's progress bar.

    Returns:
        the monitor's history: one dict of scores per evaluated epoch.
    """
    from lightning_rsm.callbacks import RSMMonitor

    _seed_quietly(seed)
    images, labels = shifted_digits(seed=seed)
    probe_idx, train_idx = split_probe(labels, per_class, seed=seed)
    train_idx = train_idx[:train_size]
    val_idx = probe_idx
    train = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), 32, shuffle=True)
    val = DataLoader(TensorDataset(images[val_idx], labels[val_idx]), 256)
    monitor = RSMMonitor(
        (images[probe_idx], labels[probe_idx]),
        list(DEMO_LAYERS),
        matcher=matcher,
        max_positions=max_positions,
    )
    logger = pl.loggers.TensorBoardLogger(str(log_dir), name="")  # a version_<n> per run
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN(width=width), train, val)
    print(format_table(monitor.history, DEMO_LAYERS))
    seconds = time.perf_counter() - start
    print(
        f"\n{len(images[train_idx])} training images, probe of {len(probe_idx)} shifted digits, "
        f"{epochs} epochs in {seconds:.0f} s. Logs in {logger.log_dir}; to see them: "
        f"tensorboard --logdir {log_dir}"
    )
    return monitor.history
