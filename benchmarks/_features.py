"""Feature sets shared by the benchmarks: random ReLU maps and a small CNN trained on digits.

Solvers behave differently on trained features (many near-ties, low rank) than on random ones,
so every benchmark reports both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


def random_relu_features(n: int, side: int, channels: int = 256, seed: int = 0) -> torch.Tensor:
    """``(n, channels, side, side)`` standard normal features passed through ReLU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, side, side, generator=gen).relu()


def shifted_digits(canvas: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits upscaled 3x onto a ``canvas`` x ``canvas`` image, each at a random offset."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    images = F.interpolate(images.unsqueeze(1), scale_factor=3, mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    room = canvas - images.shape[-1]
    out = torch.zeros(len(images), 1, canvas, canvas)
    offsets = torch.randint(0, room + 1, (len(images), 2), generator=gen)
    for k, (dy, dx) in enumerate(offsets.tolist()):
        out[k, :, dy : dy + images.shape[-2], dx : dx + images.shape[-1]] = images[k]
    return out, torch.tensor(digits.target)


class DigitsCNN(nn.Module):
    """28x28 input; ``block2`` gives 14x14x256 maps (S=196), ``block3`` 7x7x256 (S=49)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(64, 256, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b2 = self.block2(self.block1(x))
        b3 = self.block3(b2)
        return {"block2": b2, "block3": b3, "logits": self.head(b3.mean(dim=(2, 3)))}


def trained_cnn_features(n: int, epochs: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train :class:`DigitsCNN` briefly on shifted digits; features of ``n`` held-out images."""
    torch.manual_seed(seed)
    images, labels = shifted_digits(seed=seed)
    train_x, train_y = images[n:], labels[n:]
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(train_x))
        for batch in order.split(64):
            loss = F.cross_entropy(model(train_x[batch])["logits"], train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(images[:n])
    out["labels"] = labels[:n]
    return out
