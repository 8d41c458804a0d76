"""Monitor semantic RSMs of your own model: copy this file and replace the marked parts.

What it shows:
- a custom LightningModule whose forward returns a tuple (so ``logits_fn`` picks the logits),
  with a conv layer (feature maps) and a transformer layer (tokens) to monitor;
- a probe given as your own ``Dataset`` (any DataLoader, Dataset or ``(inputs, labels)`` works);
- a reference RSM (``targets``): here the semantic RSM of the raw pixels, in your case perhaps
  a teacher model's RSM or human similarity judgements over the same probe images;
- ``EarlyStopping`` on a logged RSM score, and TensorBoard logs.

Run:  python examples/custom_model.py --epochs 3
Then: tensorboard --logdir runs/custom_model
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.functional import semantic_rsm


class ConvTokens(pl.LightningModule):
    """Conv stem -> 16 tokens -> one transformer layer -> mean -> 10 logits.  <-- your model"""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.encoder = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=64, batch_first=True
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.encoder(self.stem(x).flatten(2).transpose(1, 2))  # (N, 16, dim)
        return tokens, self.head(tokens.mean(dim=1))  # a tuple: features and logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x)[1], y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x)[1].argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class ProbeImages(Dataset):
    """Your probe set: a fixed, labelled set of inputs.  <-- your data"""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


def main(epochs: int = 3, log_dir: str = "runs/custom_model") -> list[dict[str, float]]:
    pl.seed_everything(0)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target)
    train, val, probe = slice(0, 1400), slice(1400, 1700), slice(1700, 1797)
    probe_set = ProbeImages(images[probe], labels[probe])

    monitor = RSMMonitor(
        probe_set,
        ["stem", "encoder"],
        logits_fn=lambda output: output[1],  # forward returns (tokens, logits)
        targets={"pixels": semantic_rsm(images[probe])},  # a reference RSM over the probe
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(log_dir, name=""),
        callbacks=[
            monitor,
            EarlyStopping("rsm/encoder/semantic/map", mode="max", patience=2),
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(
        ConvTokens(),
        DataLoader(TensorDataset(images[train], labels[train]), batch_size=32, shuffle=True),
        DataLoader(TensorDataset(images[val], labels[val]), batch_size=256),
    )
    for row in monitor.history:
        print(
            f"epoch {row['epoch']}: encoder mAP semantic {row['rsm/encoder/semantic/map']:.3f} "
            f"baseline {row['rsm/encoder/baseline/map']:.3f}, "
            f"agreement {row['rsm/encoder/semantic/probability_agreement']:.3f}, "
            f"RSA with pixels {row['rsm/encoder/vs_pixels']:.3f}"
        )
    return monitor.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--log-dir", default="runs/custom_model")
    args = parser.parse_args()
    main(args.epochs, args.log_dir)
