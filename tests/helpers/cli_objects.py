"""What a user's LightningCLI YAML names by import path: a model whose forward returns
``(features, logits)``, a Dataset probe and an unannotated function that picks the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def _images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None].float()
    return images, labels


class ProbeDataset(Dataset):
    """``n`` labelled 8 x 8 images, three classes."""

    def __init__(self, n: int = 12, seed: int = 1) -> None:
        self.images, self.labels = _images(n, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


def pick_logits(output):  # no annotations, as a user writes it
    return output[1]


class TupleNet(LightningModule):
    """conv block -> linear head; ``forward`` returns ``(features, logits)``."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.block(x)
        return features, self.head(features.flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x)[1], y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_images(24, 0)), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def call_model(model, inputs):  # a forward_fn by import path, unannotated
    return model(inputs)
