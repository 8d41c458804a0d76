"""RSMMonitor(background=True): the synchronous numbers, logged at their own step; nothing lost
or repeated at a checkpoint, a fault, an exception or the end of the fit."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, TinyNetWithVal, trainer_kwargs
from helpers.fit import fit, untimed
from helpers.logs import csv_image_steps, csv_rows
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_batches import DictDataset, KeywordNet
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.background import Worker

WORKER = "lightning_rsm-monitor"


def run(monitor: RSMMonitor, data, tmp_path, val: bool = False, **overrides) -> pl.Trainer:
    """A seeded fit of TinyNet (with ``val``: TinyNetWithVal and its validation) on ``data``."""
    pl.seed_everything(0)
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    model = TinyNetWithVal() if val else TinyNet()
    return fit(model, loader, monitor, tmp_path, val=loader if val else None, **overrides)


@pytest.mark.oldest
@pytest.mark.parametrize("val", [False, True])
def test_background_gives_the_synchronous_numbers_bit_for_bit(data, probe, tmp_path, val):
    target = torch.rand(12, 12, generator=torch.Generator().manual_seed(0))
    options = {"layers": ["conv", "pool"], "targets": {"random": target + target.T}}
    sync = RSMMonitor(probe, **options)
    run(sync, data, tmp_path, val=val, max_epochs=4)
    background = RSMMonitor(probe, background=True, **options)
    trainer = run(background, data, tmp_path, val=val, max_epochs=4)
    assert [row["epoch"] for row in background.history] == [0, 1, 2, 3]
    assert untimed(background.history) == untimed(sync.history)  # == on floats: bit for bit
    assert torch.equal(background.layer_rsa, sync.layer_rsa)
    # the last epoch's evaluation is waited for in its hook, so Lightning has its scores
    last = background.history[-1]
    assert float(trainer.callback_metrics["rsm/pool/semantic/map"]) == pytest.approx(
        last["rsm/pool/semantic/map"]
    )
    assert not [t for t in threading.enumerate() if t.name == WORKER]


class StopAfterEpoch(Callback):
    """Stops the fit after an epoch, in a hook after the monitor's: the monitor cannot know."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_fit_stopped_unannounced_waits_for_the_last_evaluation_at_its_end(data, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], background=True)
    logger = CSVLogger(tmp_path, name="run")
    run(monitor, data, tmp_path, max_epochs=5, logger=logger, callbacks=[StopAfterEpoch(1)])
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(0, 3), (1, 6)]
    key = "rsm/conv/semantic/map"
    logged = [
        (int(r["epoch"]), int(r["step"]), float(r[key])) for r in csv_rows(logger.log_dir, key)
    ]
    # each at the step of its epoch's last batch, as Lightning logs epoch metrics
    assert logged == [(h["epoch"], h["step"] - 1, h[key]) for h in monitor.history]
    assert csv_image_steps(logger.log_dir, "rsm/conv/heatmap") == [2, 5]


# ------------------------------------------------------------------ step schedule, any batch


def read_csv_scores(logger: CSVLogger, key: str) -> list[tuple[int, int, float]]:
    return [(int(r["epoch"]), int(r["step"]), float(r[key])) for r in csv_rows(logger.log_dir, key)]


@pytest.mark.oldest
@pytest.mark.parametrize("val", [False, True])
def test_background_steps_give_the_synchronous_history_bit_for_bit(data, probe, tmp_path, val):
    """3 batches per epoch, an evaluation every 2 steps: mid-epoch, at an epoch's last batch
    (step 6) and at the fit's last step (12, waited for at its epoch end)."""
    key = "rsm/conv/semantic/map"
    histories, loggers = {}, {}
    for background in (False, True):
        monitor = RSMMonitor(probe, ["conv", "pool"], every_n_train_steps=2, background=background)
        loggers[background] = CSVLogger(tmp_path, name=f"background={background}")
        trainer = run(
            monitor,
            data,
            tmp_path,
            val=val,
            max_epochs=4,
            logger=loggers[background],
            log_every_n_steps=50,
        )
        histories[background] = monitor.history
        # the last step's scores reached Lightning in its epoch-end hook
        last = monitor.history[-1]
        assert float(trainer.callback_metrics[key]) == pytest.approx(last[key])
    assert [(row["epoch"], row["step"]) for row in histories[True]] == [
        (0, 2),
        (1, 4),
        (1, 6),
        (2, 8),
        (3, 10),
        (3, 12),
    ]
    assert untimed(histories[True]) == untimed(histories[False])  # == on floats: bit for bit
    # both modes send the scalars to the loggers at the step the features were taken
    expected = [(row["epoch"], row["step"], row[key]) for row in histories[True]]
    assert read_csv_scores(loggers[True], key) == read_csv_scores(loggers[False], key) == expected
    assert not [t for t in threading.enumerate() if t.name == WORKER]


def test_background_with_a_dict_batch_probe_and_a_keyword_forward(data, probe, tmp_path):
    """The probe forward runs in the hook with ``input_fn``/``label_fn``/``forward_fn``; the
    worker gets its features: the synchronous numbers, bit for bit."""

    def monitor(background: bool) -> RSMMonitor:
        return RSMMonitor(
            DataLoader(DictDataset(*probe), batch_size=5),
            ["conv", "pool"],
            input_fn="pixel_values",
            label_fn="labels",
            forward_fn=lambda model, x: model(pixel_values=x),
            logits_fn=lambda output: output["logits"],
            background=background,
        )

    histories = {}
    for background in (False, True):
        pl.seed_everything(0)
        callback = monitor(background)
        trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=3))
        trainer.fit(KeywordNet(), DataLoader(DictDataset(*data), batch_size=16))
        histories[background] = callback.history
    assert [row["epoch"] for row in histories[True]] == [0, 1, 2]
    assert "rsm/pool/semantic/probability_agreement" in histories[True][0]
    assert "rsm/pool/semantic/map" in histories[True][0]
    assert untimed(histories[True]) == untimed(histories[False])


@pytest.mark.parametrize(
    "reader",
    [
        lambda: ModelCheckpoint(monitor="rsm/conv/semantic/map", mode="max", every_n_train_steps=2),
        lambda: EarlyStopping("rsm/conv/semantic/map", mode="max"),
    ],
)
def test_a_reader_of_background_step_scores_fails_before_training_naming_the_fix(
    data, probe, tmp_path, reader
):
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2, background=True)
    match = r"later training batch.*pass `RSMMonitor\(every_n_train_steps=2, background=False\)`"
    with pytest.raises(MisconfigurationException, match=match) as error:
        run(monitor, data, tmp_path, callbacks=[reader()], enable_checkpointing=True)
    assert "\n" not in str(error.value)
    assert monitor.history == []
    assert not [t for t in threading.enumerate() if t.name == WORKER]


# ------------------------------------------------------------------ faults


def test_a_failure_on_the_worker_is_a_warning_and_training_goes_on(
    data, probe, tmp_path, evaluation_faults
):
    evaluation_faults.fail[1] = MemoryError("out of memory on the worker")
    monitor = RSMMonitor(probe, ["conv"], background=True)
    with pytest.warns(UserWarning, match="evaluation at epoch 1 failed and was skipped.*Memory"):
        trainer = run(monitor, data, tmp_path, max_epochs=3)
    assert trainer.current_epoch == 3
    assert [row["epoch"] for row in monitor.history] == [0, 2]
    assert "rsm/conv/rsa_to_previous" in monitor.history[1]  # against epoch 0


class CrashesAtEpoch(TinyNet):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.current_epoch == 2:
            raise RuntimeError("training crashed")
        return super().training_step(batch, batch_idx)


def test_an_exception_in_training_stops_the_worker(data, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], background=True)
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path, max_epochs=4))
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    with pytest.raises(RuntimeError, match="training crashed"):
        trainer.fit(CrashesAtEpoch(), loader)
    assert monitor._background is None
    for thread in [t for t in threading.enumerate() if t.name == WORKER]:
        thread.join(timeout=60)  # a guard against a hang, not a measurement
        assert not thread.is_alive()
    assert [row["epoch"] for row in monitor.history] in ([0], [0, 1])  # epoch 1's may be dropped


class ReleaseOnSave(Callback):
    """Releases a held evaluation once a checkpoint has taken the monitor's state, so that the
    checkpoint finds it still running."""

    def __init__(self, faults) -> None:
        self.faults = faults

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.faults.release()


@pytest.mark.parametrize("background_on_resume", [True, False])
def test_an_evaluation_pending_at_a_checkpoint_is_recomputed_at_resume(
    data, probe, tmp_path, background_on_resume, evaluation_faults
):
    def monitor(background=True) -> RSMMonitor:
        return RSMMonitor(probe, ["conv", "pool"], background=background)

    straight = monitor()
    run(straight, data, tmp_path, max_epochs=4)
    first = monitor()
    evaluation_faults.hold = 1  # until the checkpoint of epoch 1 has taken the monitor's state
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=2)
    callbacks = [saver, ReleaseOnSave(evaluation_faults)]
    run(first, data, tmp_path, max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=1.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert [row["epoch"] for row in state["history"]] == [0]
    assert [(p["epoch"], p["step"]) for p in state["pending"]] == [(1, 6)]
    resumed = monitor(background=background_on_resume)
    run(resumed, data, tmp_path, max_epochs=4, ckpt_path=path)
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3]
    assert untimed(resumed.history) == untimed(straight.history)


def test_resumed_features_that_differ_from_the_checkpoint_warn(
    data, probe, tmp_path, evaluation_faults
):
    first = RSMMonitor(probe, ["conv"], background=True)
    evaluation_faults.hold = 1
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=2)
    callbacks = [saver, ReleaseOnSave(evaluation_faults)]
    run(first, data, tmp_path, max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)
    checkpoint["callbacks"][first.state_key]["pending"][0]["fingerprint"][0] += 1.0
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    resumed = RSMMonitor(probe, ["conv"], background=True)
    with pytest.warns(UserWarning, match="differ from those taken at epoch 1"):
        run(resumed, data, tmp_path, max_epochs=3, ckpt_path=tmp_path / "edited.ckpt")
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2]


def test_worker_runs_in_order_and_stop_cancels_what_has_not_started():
    worker = Worker(threads=1)
    started, release = threading.Event(), threading.Event()
    order: list[int] = []

    def hold() -> None:
        started.set()
        release.wait(timeout=60)  # a guard against a hang, not a measurement
        order.append(1)

    first = worker.submit(hold)
    second = worker.submit(lambda: order.append(2))
    started.wait(timeout=60)
    worker.stop(timeout=0)
    release.set()
    first.result(timeout=60)
    assert second.cancelled()
    assert order == [1]
    with pytest.raises(RuntimeError, match="Expected a running worker"):
        worker.submit(lambda: None)


def test_worker_hands_back_exceptions():
    worker = Worker(threads=1)
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: 1 / 0).result(timeout=60)
    assert worker.submit(lambda: 3).result(timeout=60) == 3
    worker.stop()


# ------------------------------------------------------------------ interruption


class WideNet(pl.LightningModule):
    """conv -> 4 x 16 x 16 maps: with ``max_positions=None`` each pair is a 256 x 256 LAP, so an
    evaluation of a few dozen samples runs for many seconds on the worker's one thread."""

    def __init__(self, crash_at_epoch: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)
        self.crash_at_epoch = crash_at_epoch

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.current_epoch == self.crash_at_epoch:
            raise RuntimeError("training crashed")
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def wide_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)), torch.arange(
        n
    ) % 3


class CtrlCWhileWaiting(Callback):
    """Before the monitor's epoch-end hook (which submits the fit's last evaluation and waits
    for it): a timer sends SIGINT to this process one second later, as Ctrl-C does."""

    def __init__(self) -> None:
        self.sent_at: float | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        def interrupt() -> None:
            self.sent_at = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)

        threading.Timer(1.0, interrupt).start()


def test_ctrl_c_while_training_waits_cancels_the_evaluation_at_once(tmp_path):
    """The last evaluation (60 samples: 1,770 LAPs of 256 x 256, many seconds) is waited for;
    Ctrl-C ends the wait, cancels the worker between blocks and joins it."""
    monitor = RSMMonitor(wide_data(60, seed=1), ["conv"], max_positions=None, background=True)
    ctrl_c = CtrlCWhileWaiting()
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C
    try:
        with (
            pytest.warns(UserWarning, match=r"evaluation of epoch 0 \(step 3\) was cancelled"),
            pytest.raises(SystemExit),  # Lightning's answer to KeyboardInterrupt
        ):
            fit(
                WideNet(),
                DataLoader(TensorDataset(*wide_data(48)), batch_size=16),
                None,
                tmp_path,
                callbacks=[ctrl_c, monitor],
                max_epochs=1,
            )
        returned_at = time.perf_counter()
    finally:
        signal.signal(signal.SIGINT, handler)
    assert ctrl_c.sent_at is not None
    assert returned_at - ctrl_c.sent_at < 10.0  # generous: the evaluation needs far longer
    assert not [t for t in threading.enumerate() if t.name == WORKER]
    assert monitor.history == []


def test_an_exception_while_the_worker_computes_cancels_and_joins_it(tmp_path):
    """Epoch 0's evaluation runs on the worker when training crashes at epoch 1."""
    monitor = RSMMonitor(wide_data(60, seed=1), ["conv"], max_positions=None, background=True)
    loader = DataLoader(TensorDataset(*wide_data(48)), batch_size=16)
    start = time.perf_counter()
    with (
        pytest.warns(UserWarning, match=r"epoch 0 \(step 3\) was cancelled.*\(RuntimeError\)"),
        pytest.raises(RuntimeError, match="training crashed"),
    ):
        fit(WideNet(crash_at_epoch=1), loader, monitor, tmp_path, max_epochs=3)
    assert time.perf_counter() - start < 30.0  # generous: the evaluation needs far longer
    assert not [t for t in threading.enumerate() if t.name == WORKER]
    assert monitor.history == []
