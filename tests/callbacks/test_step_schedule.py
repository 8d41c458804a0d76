"""RSMMonitor(every_n_train_steps=...): evaluations mid-epoch, at their step, also under DDP
and across a resume; training unchanged."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, TinyNetWithVal, trainer_kwargs
from helpers.fit import fit, untimed
from helpers.logs import csv_rows
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.functional import (
    probability_agreement,
    retrieval_average_precision,
    semantic_rsm,
)


def test_step_schedule_evaluates_mid_epoch_and_logs_at_that_step(data, probe, tmp_path):
    """3 batches per epoch, an evaluation every 2 steps: steps 2 (epoch 0), 4 and 6 (epoch 1)."""
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2)
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", monitor="rsm/conv/semantic/map", mode="max", every_n_train_steps=2
    )
    logger = CSVLogger(tmp_path, name="", version="")
    fit(
        TinyNetWithVal(),
        DataLoader(TensorDataset(*data), batch_size=16),
        monitor,
        tmp_path,
        val=DataLoader(TensorDataset(*data), batch_size=16),
        callbacks=[checkpoint],
        logger=logger,
        enable_checkpointing=True,
        log_every_n_steps=50,  # Lightning would send step values to loggers only every 50 steps
    )
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(0, 2), (1, 4), (1, 6)]
    assert checkpoint.best_model_score == pytest.approx(
        max(row["rsm/conv/semantic/map"] for row in monitor.history)
    )
    logged = csv_rows(tmp_path, "rsm/conv/semantic/map")
    assert [int(row["step"]) for row in logged] == [2, 4, 6]
    assert [float(row["rsm/conv/semantic/map"]) for row in logged] == pytest.approx(
        [row["rsm/conv/semantic/map"] for row in monitor.history]
    )


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_leaves_training_identical(data, probe, tmp_path, background):
    def train(monitor: RSMMonitor | None) -> dict[str, Tensor]:
        pl.seed_everything(0)
        model = TinyNet(dropout=0.5)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=16, shuffle=True))
        return model.state_dict()

    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=1, background=background)
    with_callback, without = train(monitor), train(None)
    assert len(monitor.history) == 6
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name


@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_resume_repeats_and_loses_no_evaluation(data, probe, tmp_path, background):
    """The checkpoint of step 6 (saved after the evaluation of step 6) resumes to step 12. In
    the background no checkpoint may monitor a score of a step schedule, and the evaluation of
    step 6 may still run at the checkpoint: it is re-captured at resume."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[RSMMonitor, ModelCheckpoint]:
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2, background=background)
        checkpoint = ModelCheckpoint(
            tmp_path / f"ckpt_{max_epochs}_{ckpt_path is not None}",
            monitor=None if background else "rsm/conv/semantic/map",
            mode="max",
            every_n_train_steps=2,
            save_last=True,
        )
        trainer = pl.Trainer(
            callbacks=[monitor, checkpoint],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(TinyNet(), loader, ckpt_path=ckpt_path)
        return monitor, checkpoint

    straight, _ = run(4)
    first, checkpoint = run(2)
    resumed, _ = run(4, ckpt_path=checkpoint.last_model_path)
    assert [row["step"] for row in resumed.history] == [2, 4, 6, 8, 10, 12]
    expected, got = untimed(straight.history), untimed(resumed.history)
    for row_got, row_expected in zip(got, expected, strict=True):
        assert row_got.keys() == row_expected.keys()
        for key, value in row_expected.items():
            assert row_got[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_under_ddp_logs_the_one_process_scores(data, probe, tmp_path, background):
    """2 gloo processes, 3 steps per epoch, evaluations at steps 3 and 6 (the last)."""
    pl.seed_everything(0)
    model = TinyNet()
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=3, background=background)
    trainer = pl.Trainer(
        callbacks=[monitor],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2),
    )
    trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=8))
    model.eval()  # ddp_spawn hands rank 0's final weights and callback metrics back
    x, y = probe
    with torch.no_grad():
        features, logits = model.conv(x), model(x)
    rsm = semantic_rsm(features)
    expected = {
        "map": retrieval_average_precision(rsm, y),
        "probability_agreement": probability_agreement(rsm, logits),
    }
    for score, value in expected.items():
        logged = trainer.callback_metrics[f"rsm/conv/semantic/{score}"]
        assert float(logged) == pytest.approx(float(value), abs=1e-5)
    assert "rsm/conv/rsa_to_previous" in trainer.callback_metrics  # two evaluations
