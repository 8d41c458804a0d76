"""One step per evaluation for its scalars and images, the step Lightning gives the epoch's other
metrics, with and without background, read back from real loggers (offline): TensorBoard event
files, CSV ``metrics.csv`` and PNG files, a W&B offline run and an MLflow file store."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch.nn.functional as F
from conftest import TinyNet, TinyNetWithVal
from helpers.fit import fit, untimed
from helpers.logs import csv_image_steps, csv_steps, mlflow_steps, tensorboard_steps, wandb_steps
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

KEY, IMAGE = "rsm/conv/semantic/map", "rsm/conv/heatmap"


class EpochLossNet(TinyNet):
    """No validation; the training loss logged per epoch, the epoch's other metric."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)
        return loss


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and an MLflow file store, both under ``tmp_path``."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def fit_with_every_logger(data, probe, folder, *, val: bool, **options) -> dict:
    """A 3-epoch fit (3 batches an epoch) with all four loggers; the steps each wrote per key."""
    import wandb
    from mlflow import MlflowClient

    folder.mkdir()
    uri = (folder / "mlruns").as_uri()
    tensorboard = TensorBoardLogger(folder, name="tb", version="")
    csv = CSVLogger(folder, name="csv", version="")
    mlflow = MLFlowLogger(experiment_name="steps", tracking_uri=uri)
    wandb_logger = WandbLogger(save_dir=str(folder), project="steps", offline=True)
    pl.seed_everything(0)
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], **options)
    model = TinyNetWithVal() if val else EpochLossNet()
    loggers = [tensorboard, csv, wandb_logger, mlflow]
    try:
        fit(
            model,
            loader,
            monitor,
            folder,
            val=loader if val else None,
            max_epochs=3,
            logger=loggers,
            log_every_n_steps=1,
        )
    finally:
        wandb.finish()
    other = "val_loss" if val else "epoch_loss"
    tb = tensorboard_steps(folder / "tb")
    wb = wandb_steps(str(folder))
    client = MlflowClient(uri)
    run_id = mlflow.run_id
    return {
        "history": untimed(monitor.history),
        "tensorboard": (tb[other], tb[KEY], tb[IMAGE]),
        "csv": (
            csv_steps(folder / "csv", other),
            csv_steps(folder / "csv", KEY),
            csv_image_steps(folder / "csv", IMAGE),
        ),
        "wandb": (wb[other], wb[KEY], wb[IMAGE]),
        "mlflow": tuple(mlflow_steps(client, run_id, key) for key in (other, KEY, IMAGE)),
    }


@pytest.mark.parametrize("val", [True, False])
def test_scalars_and_images_share_the_step_of_the_epochs_other_metrics(
    data, probe, tmp_path, offline, val
):
    runs = {
        background: fit_with_every_logger(
            data, probe, tmp_path / f"background={background}", val=val, background=background
        )
        for background in (False, True)
    }
    assert runs[True]["history"] == runs[False]["history"]
    for background, logged in runs.items():
        for logger in ("tensorboard", "csv", "wandb", "mlflow"):
            other, scalars, images = logged[logger]
            assert other == scalars == images == [2, 5, 8], (background, logger)


def test_step_schedule_logs_scalars_and_images_at_the_evaluations_step(
    data, probe, tmp_path, offline
):
    """Every 2 optimizer steps: ``trainer.global_step`` after the step, 2, 4, ... 8."""
    for background in (False, True):
        logged = fit_with_every_logger(
            data,
            probe,
            tmp_path / f"background={background}",
            val=True,
            every_n_train_steps=2,
            background=background,
        )
        assert [row["step"] for row in logged["history"]] == [2, 4, 6, 8]
        for logger in ("tensorboard", "csv", "wandb", "mlflow"):
            _, scalars, images = logged[logger]
            assert scalars == images == [2, 4, 6, 8], (background, logger)
