"""RSMMonitor on token layers ``(N, T, D)``: special tokens kept out of pooled patches."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import make_data
from helpers.fit import fit
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor


class TinyViT(pl.LightningModule):
    """Patch embedding (1 x 1 patches of a 10 x 10 image) + CLS + one transformer layer."""

    def __init__(self, dim: int = 8, side: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 1)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + side * side, dim))
        self.encoder = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)  # (N, 100, dim)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), patches], dim=1) + self.position
        return self.head(self.encoder(tokens)[:, 0])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def vit_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    images, labels = make_data(n, seed)
    return F.interpolate(images, size=(10, 10)), labels


def test_token_layers_keep_the_cls_token_out_of_pooled_patches(tmp_path):
    """101 tokens = CLS + 10 x 10 patches, max_positions=25: the patches pool as a grid."""
    loader = DataLoader(TensorDataset(*vit_data(24, 0)), batch_size=12)
    probe = vit_data(9, 1)
    runs = {}
    for tokens in ("all", "patches", "special"):
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, ["encoder"], max_positions=25, special_tokens=1, tokens=tokens)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(TinyViT(), loader, monitor, tmp_path)
        runs[tokens] = monitor.history[-1], monitor.rsms["encoder"]["semantic"]
        pooled = [str(w.message) for w in record if "'encoder' has 101 tokens" in str(w.message)]
        if tokens == "special":
            assert pooled == []
        else:
            assert len(pooled) == 1  # once, not per batch or per evaluation
            assert "patches are average-pooled as a 10 x 10 grid to 5 x 5" in pooled[0]
    # one concept vector (the CLS token): the semantic RSM is the baseline
    special = runs["special"][0]
    assert special["rsm/encoder/semantic/map"] == special["rsm/encoder/baseline/map"]
    assert not torch.allclose(runs["all"][1], runs["patches"][1])  # the CLS counts in "all"


def test_pooled_tokens_without_special_tokens_warn_with_a_hint(tmp_path):
    loader = DataLoader(TensorDataset(*vit_data(24, 0)), batch_size=12)
    monitor = RSMMonitor(vit_data(9, 1), ["encoder"], max_positions=25)
    with pytest.warns(UserWarning, match=r"101 = 1 \+ 10 x 10: .* `special_tokens=1`"):
        fit(TinyViT(), loader, monitor, tmp_path, max_epochs=1)
