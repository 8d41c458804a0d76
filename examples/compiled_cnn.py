"""Monitor a ``torch.compile``'d CNN: the probe runs eagerly, the training graph is untouched.

What it shows:
- ``trainer.fit(torch.compile(model))``: RSMMonitor runs its probe through the same module with
  compilation switched off (``torch.compiler.set_stance("force_eager")``), so its forward hooks
  never enter the compiled graph: no graph break, no recompilation, no Inductor error;
- layers named as in the uncompiled model (for a compiled submodule, ``"net.layer1"`` works as
  well as ``"net._orig_mod.layer1"``);
- a small residual CNN (the shape of a ResNet) whose blocks give feature maps ``(N, C, H, W)``;
  ``torch.compile(self.net)`` inside a LightningModule works the same way (hooks on the
  original submodules, run eagerly).

Run:  python examples/compiled_cnn.py --epochs 2
(Inductor compiles with the machine's C++ compiler; the first steps take some seconds.)
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(pl.LightningModule):
    """stem -> layer1 (8 x 8) -> down -> layer2 (4 x 4) -> pool -> 10 logits.  <-- your model"""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width))
        self.layer1 = Residual(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.layer2 = Residual(2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.down(self.layer1(F.relu(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs: dict[str, Tensor], batch: Any, batch_idx: int) -> None:
        # Logged here, outside the compiled training_step: with Lightning 2.6 and torch 2.13,
        # `self.log` inside a compiled training_step fails to trace (with or without RSMMonitor).
        self.log("train/loss", outputs["loss"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(epochs: int = 2, limit_train_batches: int | float = 1.0) -> list[dict[str, float]]:
    pl.seed_everything(0)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target)
    probe = images[1700:], labels[1700:]  # 97 held-out digits

    monitor = RSMMonitor(probe, ["layer1", "layer2"])
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_train_batches=limit_train_batches,
    )
    model = torch.compile(SmallResNet())  # <-- compiled as a whole
    trainer.fit(model, DataLoader(TensorDataset(images[:1700], labels[:1700]), batch_size=64))
    for row in monitor.history:
        print(
            f"epoch {row['epoch']}: layer2 mAP semantic {row['rsm/layer2/semantic/map']:.3f} "
            f"baseline {row['rsm/layer2/baseline/map']:.3f}"
        )
    return monitor.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    main(args.epochs)
