"""RSMMonitor(probe=None): a class-balanced probe from the fit's validation data, fixed across
runs and resumes; training unchanged."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, TinyNetWithVal, trainer_kwargs
from helpers.fit import fit
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.probe_selection import select_probe


def test_probe_from_validation_data_is_balanced_fixed_and_leaves_training_identical(data, tmp_path):
    x, y = data

    def train(monitor: RSMMonitor | None) -> dict[str, Tensor]:
        pl.seed_everything(0)
        model = TinyNetWithVal(dropout=0.5)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        val = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffle is ignored
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), val)
        return model.state_dict()

    monitor = RSMMonitor(layers=["conv"], probe_size=12)
    with_callback, without = train(monitor), train(None)
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name
    assert torch.bincount(monitor._labels).tolist() == [4, 4, 4]
    expected_x, expected_y = select_probe(DataLoader(TensorDataset(x, y)), 12, 5)
    assert torch.equal(monitor._inputs, expected_x) and torch.equal(monitor._labels, expected_y)
    assert len(monitor.history) == 2


class ValData(pl.LightningDataModule):
    def __init__(self, data: tuple[Tensor, Tensor]) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=16)


def test_probe_from_a_datamodule_is_the_same_after_a_resume(data, tmp_path):
    """TinyNet has no validation_step: the probe comes from the datamodule's val_dataloader."""

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[RSMMonitor, pl.Trainer]:
        monitor = RSMMonitor(layers=["conv"], probe_size=9)
        trainer = pl.Trainer(
            callbacks=[monitor, ModelCheckpoint(tmp_path / "ckpt", save_last=True)],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(TinyNet(), datamodule=ValData(data), ckpt_path=ckpt_path)
        return monitor, trainer

    first, _ = run(1)
    resumed, _ = run(2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(first._inputs, resumed._inputs)
    assert torch.bincount(resumed._labels).tolist() == [3, 3, 3]
    assert [row["epoch"] for row in resumed.history] == [0, 1]


def test_no_probe_and_no_validation_data_fails_before_training(data, tmp_path):
    monitor = RSMMonitor(layers=["conv"])
    with pytest.raises(MisconfigurationException, match="Expected validation data for"):
        fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16), monitor, tmp_path)
