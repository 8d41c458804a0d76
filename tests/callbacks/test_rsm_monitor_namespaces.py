"""RSMMonitor's end-to-end guarantees under both Lightning namespaces: `import lightning as L`
(lightning.pytorch) and `import pytorch_lightning as pl`."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import NAMESPACES, TINY_NETS, trainer_kwargs
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest


@pytest.fixture(params=NAMESPACES)
def ns(request):
    """The namespace's module, its TinyNet and TinyNetWithVal."""
    return importlib.import_module(request.param), *TINY_NETS[request.param]


def _untimed(history):
    return [{k: v for k, v in row.items() if k != "rsm/time_s"} for row in history]


def test_training_is_identical_with_and_without_the_callback(ns, data, probe, tmp_path):
    namespace, _, tiny_with_val = ns

    def train(monitor):
        namespace.seed_everything(0)
        model = tiny_with_val(dropout=0.5)
        trainer = namespace.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        loader = DataLoader(TensorDataset(*data), batch_size=16, shuffle=True)
        trainer.fit(model, loader, DataLoader(TensorDataset(*data), batch_size=16))
        return model.state_dict()

    monitor = RSMMonitor(probe, ["conv", "pool"])
    with_callback, without = train(monitor), train(None)
    assert [row["epoch"] for row in monitor.history] == [0, 1]
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name


def test_resume_repeats_and_loses_no_evaluation(ns, data, probe, tmp_path):
    namespace, _, tiny_with_val = ns
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(max_epochs, folder, ckpt_path=None):
        namespace.seed_everything(0)
        monitor = RSMMonitor(probe, ["conv"])
        checkpoint = namespace.callbacks.ModelCheckpoint(tmp_path / folder, save_last=True)
        trainer = namespace.Trainer(
            callbacks=[monitor, checkpoint],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(tiny_with_val(), loader, loader, ckpt_path=ckpt_path)
        return monitor, checkpoint

    straight, _ = run(3, "straight")
    _, checkpoint = run(1, "first")
    resumed, _ = run(3, "resumed", ckpt_path=checkpoint.last_model_path)
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2]
    for got, expected in zip(_untimed(resumed.history), _untimed(straight.history), strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), key


def test_images_reach_the_namespace_loggers(ns, loader, probe, tmp_path):
    namespace, tiny, _ = ns
    loggers = [
        namespace.loggers.TensorBoardLogger(tmp_path, name="tb", version=""),
        namespace.loggers.CSVLogger(tmp_path, name="csv", version=""),
    ]
    trainer = namespace.Trainer(
        callbacks=[RSMMonitor(probe, ["conv"], baseline=False)],
        **trainer_kwargs(tmp_path, max_epochs=1, logger=loggers),
    )
    trainer.fit(tiny(), loader)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = {"rsm/conv/heatmap", "rsm/conv/neighbours", "rsm/history"}
    assert set(events.Tags()["images"]) == tags
    pngs = sorted(p.name for p in (tmp_path / "csv" / "rsm").iterdir())
    assert pngs == [  # 3 batches: the step of the epoch's last batch, as its epoch metrics
        "rsm__conv__heatmap_step00000002.png",
        "rsm__conv__neighbours_step00000002.png",
        "rsm__history_step00000002.png",
    ]
    assert Image.open(tmp_path / "csv" / "rsm" / pngs[0]).size[0] >= 256


def test_an_unknown_layer_is_the_namespace_misconfiguration(ns, loader, probe, tmp_path):
    namespace, tiny, _ = ns
    exception = importlib.import_module(
        f"{namespace.__name__}.utilities.exceptions"
    ).MisconfigurationException
    trainer = namespace.Trainer(
        callbacks=[RSMMonitor(probe, ["nope"])], **trainer_kwargs(tmp_path, max_epochs=1)
    )
    with pytest.raises(exception, match=r"\['nope'\]"):
        trainer.fit(tiny(), loader)
