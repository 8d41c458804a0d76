"""Monitor the token layers of a small vision transformer fed HuggingFace-style dict batches.

What it shows:
- a dataset yielding ``{"pixel_values": ..., "labels": ...}`` and a model whose forward takes
  keywords only and returns a dict (``input_fn``, ``label_fn`` and ``logits_fn`` pick the parts;
  a dict of inputs is passed as ``model(**inputs)``; ``forward_fn`` covers any other call);
- token layers ``(N, T, D)`` with a CLS token before 8 x 8 patch tokens: ``special_tokens=1``
  keeps the CLS token out of any pooling (65 tokens would otherwise be averaged along T to 64,
  mixing the CLS token into a patch); ``tokens="patches"`` or ``"special"`` keep only one role;
- evaluations every ``every_n_train_steps`` optimizer steps (mid-epoch), for runs whose epochs
  are long;
- no hand-built probe: ``probe=None`` takes ``probe_size`` class-balanced samples of the
  validation data, with a fixed seed.

Run:  python examples/transformer_tokens.py --steps 200
Then: tensorboard --logdir runs/transformer_tokens
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_rsm import RSMMonitor


class DigitsDict(Dataset):
    """8 x 8 digits upsampled to 16 x 16, each sample a dict.  <-- your dataset"""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = F.interpolate(images, size=(16, 16), mode="bilinear")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class TinyViT(pl.LightningModule):
    """2 x 2 patches of 16 x 16 images (8 x 8 = 64 tokens) + a CLS token, two transformer
    layers, logits from the CLS token.  <-- your model"""

    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + 64, dim))
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True)
                for _ in range(depth)
            ]
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, *, pixel_values: Tensor) -> dict[str, Tensor]:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (N, 64, dim)
        cls = self.cls_token.expand(len(patches), -1, -1)
        tokens = self.blocks(torch.cat([cls, patches], dim=1) + self.position)  # (N, 65, dim)
        return {"logits": self.head(tokens[:, 0]), "last_hidden_state": tokens}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(pixel_values=batch["pixel_values"])["logits"], batch["labels"])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(pixel_values=batch["pixel_values"])["logits"]
        self.log("val/acc", (logits.argmax(dim=1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def main(
    steps: int = 200,
    every_n_train_steps: int = 50,
    probe_size: int = 100,
    log_dir: str = "runs/transformer_tokens",
) -> list[dict[str, float]]:
    pl.seed_everything(0)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target)

    monitor = RSMMonitor(
        layers=["blocks.0", "blocks.1"],  # outputs (N, 65, 32): CLS + 8 x 8 patches
        probe_size=probe_size,  # probe=None: class-balanced samples of the validation data
        input_fn=lambda batch: {"pixel_values": batch["pixel_values"]},  # -> model(**inputs)
        label_fn="labels",
        logits_fn=lambda output: output["logits"],
        special_tokens=1,  # the CLS token is never pooled into a patch
        every_n_train_steps=every_n_train_steps,
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=TensorBoardLogger(log_dir, name=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(
        TinyViT(),
        DataLoader(DigitsDict(images[:1400], labels[:1400]), batch_size=64, shuffle=True),
        DataLoader(DigitsDict(images[1400:], labels[1400:]), batch_size=256),
    )
    for row in monitor.history:
        print(
            f"step {row['step']}: blocks.1 mAP semantic {row['rsm/blocks.1/semantic/map']:.3f} "
            f"baseline {row['rsm/blocks.1/baseline/map']:.3f}, "
            f"agreement {row['rsm/blocks.1/semantic/probability_agreement']:.3f}"
        )
    return monitor.history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every-n-train-steps", type=int, default=50)
    parser.add_argument("--log-dir", default="runs/transformer_tokens")
    args = parser.parse_args()
    main(args.steps, args.every_n_train_steps, log_dir=args.log_dir)
