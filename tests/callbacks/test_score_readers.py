"""Callbacks that read an ``rsm/`` key (ModelCheckpoint, EarlyStopping, any other) with real
Trainers: what they find at their own schedule, through ``trainer.callback_metrics`` only."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from conftest import TinyNet, TinyNetWithVal
from helpers.fit import fit
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

KEY = "rsm/conv/semantic/map"


class Reads(pl.Callback):
    """Records ``trainer.callback_metrics[KEY]`` (or None) where readers look: after each
    training batch and at each epoch end."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, float | None]] = []

    def _read(self, trainer: pl.Trainer, hook: str) -> None:
        value = trainer.callback_metrics.get(KEY)
        self.seen.append((trainer.global_step, hook, None if value is None else float(value)))

    def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
        self._read(trainer, "batch")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read(trainer, "epoch")


@pytest.mark.parametrize(
    "options", [{"every_n_epochs": 2}, {"every_n_train_steps": 2}, {"background": True}]
)
def test_callback_metrics_hold_the_latest_scores_from_the_first_evaluation_on(
    data, probe, tmp_path, options
):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor, reads = RSMMonitor(probe, ["conv"], **options), Reads()
    fit(TinyNet(), loader, monitor, tmp_path, callbacks=[reads], max_epochs=4)
    values = {row["step"]: row[KEY] for row in monitor.history}
    for step, hook, seen in reads.seen:
        # an epoch's evaluation is taken at its end, after the read of its last batch
        done = step if hook == "epoch" or "every_n_train_steps" in options else step - 1
        earlier = [pytest.approx(values[s]) for s in sorted(values) if s <= done]
        if not earlier:
            assert seen is None, step  # before the first evaluation the key is missing
        elif options.get("background"):  # late: the latest delivered evaluation, once there
            assert seen is None or seen in earlier, step
        else:
            assert seen == earlier[-1], step  # the latest evaluation's score
    assert reads.seen[-1][2] == pytest.approx(monitor.history[-1][KEY])


def test_checkpoint_at_the_monitors_interval_keeps_the_best_evaluation(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", monitor=KEY, mode="max", every_n_epochs=2, save_top_k=-1
    )
    stopping = EarlyStopping(KEY, mode="max", patience=5, check_on_train_epoch_end=False)
    fit(
        TinyNetWithVal(),
        loader,
        monitor,
        tmp_path,
        val=loader,
        callbacks=[checkpoint, stopping],
        enable_checkpointing=True,
        max_epochs=4,
        check_val_every_n_epoch=2,
    )
    assert [row["epoch"] for row in monitor.history] == [1, 3]
    saved = sorted(float(score) for score in checkpoint.best_k_models.values())
    assert saved == pytest.approx(sorted(row[KEY] for row in monitor.history))


def test_checkpoint_every_epoch_misses_the_key_before_the_first_evaluation(data, probe, tmp_path):
    """Without validation ModelCheckpoint warns and skips epoch 0, then saves each epoch with the
    latest evaluation's score; with validation it raises at epoch 0."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", monitor=KEY, mode="max", save_top_k=-1)
    with pytest.warns(UserWarning, match="could not find the monitored key"):
        fit(
            TinyNet(),
            loader,
            monitor,
            tmp_path,
            callbacks=[checkpoint],
            enable_checkpointing=True,
            max_epochs=4,
        )
    epoch_1, epoch_3 = (row[KEY] for row in monitor.history)
    saved = sorted(
        (path.split("epoch=")[1][0], float(v)) for path, v in checkpoint.best_k_models.items()
    )
    assert saved == [("1", epoch_1), ("2", epoch_1), ("3", epoch_3)]

    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt_val", monitor=KEY, mode="max")
    with pytest.raises(MisconfigurationException, match="could not find the monitored key"):
        fit(
            TinyNetWithVal(),
            loader,
            monitor,
            tmp_path,
            val=loader,
            callbacks=[checkpoint],
            enable_checkpointing=True,
            max_epochs=4,
        )


@pytest.mark.parametrize("strict", [True, False])
def test_early_stopping_every_epoch_before_and_between_evaluations(data, probe, tmp_path, strict):
    """Strict: the key is missing at epoch 0. Not strict: epoch 0 is skipped, and epoch 2 sees
    epoch 1's score again, which counts against ``patience`` as no improvement."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    stopping = EarlyStopping(KEY, mode="max", patience=1, strict=strict)
    if strict:
        with pytest.raises(RuntimeError, match=f"metric `{KEY}` which is not available"):
            fit(TinyNet(), loader, monitor, tmp_path, callbacks=[stopping], max_epochs=6)
        return
    trainer = fit(TinyNet(), loader, monitor, tmp_path, callbacks=[stopping], max_epochs=6)
    assert [row["epoch"] for row in monitor.history] == [1]
    assert stopping.stopped_epoch == trainer.current_epoch - 1 == 2


def test_early_stopping_listed_before_the_monitor_reads_the_same_epochs_score(
    data, probe, tmp_path
):
    """Without validation both act in ``on_train_epoch_end``; Lightning calls EarlyStopping and
    ModelCheckpoint there after every other callback, whatever the order of ``callbacks``; other
    callbacks run in their order."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor, stopping = RSMMonitor(probe, ["conv"]), EarlyStopping(KEY, mode="max", patience=1)
    reads = Reads()
    fit(TinyNet(), loader, None, tmp_path, callbacks=[stopping, reads, monitor], max_epochs=3)
    assert float(stopping.best_score) == pytest.approx(max(row[KEY] for row in monitor.history))
    # an ordinary callback listed before the monitor reads there the previous epoch's score
    assert reads.seen[-1][1:] == ("epoch", pytest.approx(monitor.history[-2][KEY]))


def test_step_schedule_readers_at_other_steps_read_the_latest_evaluation(data, probe, tmp_path):
    """Evaluations at steps 2, 4, 6; a checkpoint every 3 steps reads step 2's score at step 3
    and step 6's at step 6 (checkpoints run last); EarlyStopping at epoch ends (steps 3, 6)."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2)
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", "{step}", monitor=KEY, mode="max", every_n_train_steps=3, save_top_k=-1
    )
    stopping = EarlyStopping(KEY, mode="max", patience=5)
    fit(
        TinyNet(),
        loader,
        monitor,
        tmp_path,
        callbacks=[checkpoint, stopping],
        enable_checkpointing=True,
        max_epochs=2,
    )
    values = {row["step"]: row[KEY] for row in monitor.history}
    assert sorted(values) == [2, 4, 6]
    saved = sorted(
        (path.split("step=")[1].split(".")[0], float(v))
        for path, v in checkpoint.best_k_models.items()
    )
    assert saved == [("3", pytest.approx(values[2])), ("6", pytest.approx(values[6]))]
    assert float(stopping.best_score) == pytest.approx(max(values[2], values[6]))
