"""One callback class for ``lightning.pytorch`` and ``pytorch_lightning``: real Trainers of both,
and runs with one namespace hidden as if it were not installed."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
from namespace_tools import EpochRecorder, tiny_data, tiny_module, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import namespaces
from lightning_rsm.namespaces import is_fitting, is_lightning_class

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


@pytest.fixture
def loader() -> DataLoader:
    return DataLoader(TensorDataset(*tiny_data()), batch_size=4)


def test_both_namespaces_importable_and_callback_bases_cover_them():
    assert namespaces.importable_namespaces() == ("lightning.pytorch", "pytorch_lightning")
    bases = namespaces.CALLBACK_BASES
    assert bases == (L.Callback, pl.Callback)
    recorder = EpochRecorder()
    assert isinstance(recorder, L.Callback)
    assert isinstance(recorder, pl.Callback)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        namespaces.Nothing  # noqa: B018


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_callback_runs_checkpoints_and_resumes(namespace, tmp_path, loader):
    """Hooks, state_key and state_dict/load_state_dict with each namespace's Trainer."""
    callbacks = importlib.import_module(f"{namespace}.callbacks")
    checkpoint = callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first, other = EpochRecorder("a"), EpochRecorder("b")
    trainer = tiny_trainer(
        namespace,
        tmp_path,
        callbacks=[first, other, checkpoint],
        enable_checkpointing=True,
        limit_val_batches=1,
    )
    trainer.fit(tiny_module(namespace), loader, loader)
    assert first.epochs == [0]
    assert first.fitting == [True, True]  # the validation epoch, then the training epoch
    assert first.state_key == "EpochRecorder{'name': 'a'}"

    resumed = EpochRecorder("a")
    trainer = tiny_trainer(namespace, tmp_path, max_epochs=2, callbacks=[resumed])
    trainer.fit(tiny_module(namespace), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.loaded == {"epochs": [0]}
    assert resumed.epochs == [0, 1]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_is_fitting_false_outside_fit(namespace, tmp_path, loader):
    recorder = EpochRecorder()
    trainer = tiny_trainer(namespace, tmp_path, callbacks=[recorder])
    trainer.validate(tiny_module(namespace), loader, verbose=False)
    assert recorder.fitting == [False]
    assert not is_fitting(trainer)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_misconfiguration_exception_caught_by_either_namespace(namespace):
    expected = importlib.import_module(f"{namespace}.utilities.exceptions")
    with pytest.raises(expected.MisconfigurationException, match="bad option"):
        raise namespaces.MisconfigurationException("bad option")


def test_misconfiguration_exception_pickles():
    """Exceptions cross process boundaries (DDP spawn) by pickle."""
    error = pickle.loads(pickle.dumps(namespaces.MisconfigurationException("bad option")))
    assert type(error) is namespaces.MisconfigurationException
    assert str(error) == "bad option"


def test_rank_zero_utilities_shared_by_both_namespaces():
    for name in ("rank_zero_warn", "rank_zero_only", "WarningCache"):
        found = getattr(namespaces, name)
        assert found is getattr(L.utilities.rank_zero, name)
        assert found is getattr(pl.utilities.rank_zero, name)
    cache = namespaces.WarningCache()
    with pytest.warns(UserWarning, match="only once") as record:
        cache.warn("only once")
        cache.warn("only once")
    assert len(record) == 1


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_is_lightning_class_over_namespaces_and_subclasses(namespace, tmp_path):
    loggers = importlib.import_module(f"{namespace}.loggers")

    class MyTensorBoard(loggers.TensorBoardLogger):
        pass

    class TensorBoardLogger:  # a namesake outside Lightning
        pass

    assert is_lightning_class(loggers.TensorBoardLogger(tmp_path), "TensorBoardLogger")
    assert is_lightning_class(MyTensorBoard(tmp_path), "TensorBoardLogger")
    assert not is_lightning_class(loggers.CSVLogger(tmp_path), "TensorBoardLogger")
    assert not is_lightning_class(TensorBoardLogger(), "TensorBoardLogger")


# ---------------------------------------------------------------- RSMMonitor in both namespaces


@pytest.mark.parametrize(
    "namespace",
    [
        "lightning.pytorch",
        "pytorch_lightning",
    ],
)
def test_rsm_monitor_writes_images_with_each_namespace(namespace, tmp_path, loader):
    """With `import lightning as L`, L's own TensorBoardLogger gets the images too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_rsm import RSMMonitor

    x, y = tiny_data()
    monitor = RSMMonitor((x, y), ["layer"], baseline=False)
    logger = importlib.import_module(f"{namespace}.loggers").TensorBoardLogger(
        tmp_path, name="", version=""
    )
    trainer = tiny_trainer(namespace, tmp_path, callbacks=[monitor], logger=logger)
    trainer.fit(tiny_module(namespace), loader)
    assert len(monitor.history) == 1
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"rsm/layer/heatmap", "rsm/history"}


# ---------------------------------------------------------------- one namespace hidden

HIDDEN = {
    "lightning.pytorch": ["pytorch_lightning", "lightning_fabric"],
    "pytorch_lightning": ["lightning"],
}


@pytest.fixture(scope="module", params=NAMESPACES)
def only(request):
    """(namespace left, report of tests/namespace_tools.py run with the other one hidden)."""
    script = os.path.join(os.path.dirname(__file__), "namespace_tools.py")
    done = subprocess.run(
        [sys.executable, script, *HIDDEN[request.param]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, json.loads(done.stdout.strip().splitlines()[-1])


def test_only_one_namespace_runs_callback_and_images(only):
    namespace, report = only
    assert report["namespaces"] == [namespace]
    assert report["hidden_imported"] == []
    assert report["epochs"] == [0]
    assert report["pngs"] == ["rsm__demo__heatmap_step00000002.png"]
    assert report["tensorboard_events"]
    assert report["caught_by_namespace"]


def test_only_one_namespace_runs_rsm_monitor(only):
    namespace, report = only
    assert report.get("rsm_monitor_error") is None
    assert report["rsm_monitor_evaluations"] == 2
