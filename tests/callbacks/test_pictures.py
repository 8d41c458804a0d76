"""The monitor's pictures with a real Trainer: which figures are logged, at which step, from which
RSMs, on which colour scale; the public results (``rsms``, ``probe``) and the plots drawn from
them (``plot_history``, ``plot_neighbours``)."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyNet, TinyNetWithVal
from helpers.fit import fit
from helpers.logs import csv_image_steps, csv_steps
from PIL import Image
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.functional import rsm_scores
from lightning_rsm.plotting import next_colour_range

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

LAYERS = ["conv", "pool"]


class VectorNet(TinyNet):
    """Vector inputs ``(B, 16)``: a hidden layer ``(B, 8)`` and 3 logits; nothing to draw."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))


class Recorder(pl.Callback):
    """After the monitor (listed before it), each epoch: its colour ranges and RSMs."""

    def __init__(self, monitor: RSMMonitor) -> None:
        self.monitor = monitor
        self.ranges: list[dict] = []
        self.rsms: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ranges.append(dict(self.monitor._ranges))
        self.rsms.append(self.monitor.rsms)


def vectors(data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    images, labels = data
    return F.avg_pool2d(images, 2).flatten(1), labels  # (N, 16)


def test_figures_reach_the_csv_logger_at_the_scalars_step(data, probe, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, LAYERS)
    fit(TinyNetWithVal(), loader, monitor, tmp_path, val=loader, max_epochs=2, logger=logger)
    steps = csv_steps(logger.log_dir, "rsm/conv/semantic/map")
    assert steps == csv_steps(logger.log_dir, "val_loss") == [2, 5]
    tags = [f"rsm/{layer}/{name}" for layer in LAYERS for name in ("heatmap", "neighbours")]
    for tag in [*tags, "rsm/layer_rsa"]:
        assert csv_image_steps(logger.log_dir, tag) == steps, tag
    assert csv_image_steps(logger.log_dir, "rsm/history") == steps[-1:]
    for path in (tmp_path / "run" / "version_0" / "rsm").iterdir():
        width, height = Image.open(path).size
        assert min(width, height) >= 200, path.name


def test_a_probe_of_vectors_gets_no_neighbours_and_no_warning(data, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    loader = DataLoader(TensorDataset(*vectors(data)), batch_size=16)
    monitor = RSMMonitor(vectors(data), ["hidden"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(VectorNet(), loader, monitor, tmp_path, max_epochs=1, logger=logger)
    messages = [str(w.message) for w in record]
    assert not [m for m in messages if "image" in m.lower() or "RSMMonitor" in m], messages
    names = {p.name.split("_step")[0] for p in (tmp_path / "run" / "version_0" / "rsm").iterdir()}
    assert names == {"rsm__hidden__heatmap", "rsm__history"}
    with pytest.raises(ValueError, match="Expected the probe inputs to be images"):
        monitor.plot_neighbours("hidden")


def test_image_fn_draws_the_neighbours_of_any_probe(data, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    x, y = vectors(data)
    calls = []

    def image_fn(inputs: Tensor) -> Tensor:
        calls.append(inputs.shape)
        return inputs.view(-1, 1, 4, 4)

    monitor = RSMMonitor((x, y), ["hidden"], image_fn=image_fn)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fit(VectorNet(), loader, monitor, tmp_path, max_epochs=1, logger=logger)
    assert calls == [x.shape]  # once, on the whole probe, at fit start
    assert csv_image_steps(logger.log_dir, "rsm/hidden/neighbours") == [2]
    figure = monitor.plot_neighbours("hidden", queries=[0, 1], k=3)
    frames = {patch.get_gid() for patch in figure.axes[0].patches}
    assert {"query/0", "query/1", "semantic/1/2"} <= frames


def test_an_image_fn_that_makes_no_images_fails_at_fit_start(data, tmp_path):
    x, y = vectors(data)
    monitor = RSMMonitor((x, y), ["hidden"], image_fn=lambda inputs: inputs)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match=r"`image_fn` to return a tensor of shape \(N, 1 \| 3"):
        fit(VectorNet(), loader, monitor, tmp_path, max_epochs=1)
    with pytest.raises(TypeError, match="image_fn"):
        RSMMonitor((x, y), ["hidden"], image_fn="pixels")


def test_the_colour_scale_is_held_and_a_resume_draws_as_a_straight_run(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[Recorder, ModelCheckpoint]:
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, LAYERS)
        recorder = Recorder(monitor)
        name = f"{max_epochs}_{ckpt_path is not None}"
        checkpoint = ModelCheckpoint(tmp_path / f"ckpt_{name}", save_last=True)
        logger = CSVLogger(tmp_path, name=f"run_{name}")
        fit(
            TinyNet(),
            loader,
            monitor,
            tmp_path,
            callbacks=[recorder, checkpoint],
            logger=logger,
            max_epochs=max_epochs,
            enable_checkpointing=True,
            ckpt_path=ckpt_path,
        )
        return recorder, checkpoint

    straight, _ = run(4)
    # the rule of next_colour_range, with the range held from the evaluation before
    held = None
    for ranges, rsms in zip(straight.ranges, straight.rsms, strict=True):
        for layer in LAYERS:
            before = None if held is None else held[layer]
            assert ranges[layer] == next_colour_range(before, list(rsms[layer].values()))
        held = ranges
    first, checkpoint = run(2)
    resumed, _ = run(4, ckpt_path=checkpoint.last_model_path)
    before = first.ranges[-1]
    for layer in LAYERS:  # the resumed run starts from the checkpoint's ranges
        kinds = list(resumed.rsms[0][layer].values())
        assert resumed.ranges[0][layer] == next_colour_range(before[layer], kinds)
    for got, expected in zip(resumed.ranges, straight.ranges[2:], strict=True):
        for layer in LAYERS:
            assert got[layer] == pytest.approx(expected[layer], abs=1e-5)


def test_heatmap_range_fixes_every_scale(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], heatmap_range=(-1.0, 1.0))
    recorder = Recorder(monitor)
    logger = CSVLogger(tmp_path, name="run")
    fit(TinyNet(), loader, monitor, tmp_path, callbacks=[recorder], max_epochs=2, logger=logger)
    assert monitor._ranges == {}  # nothing to hold: the option is the scale
    assert csv_image_steps(logger.log_dir, "rsm/conv/heatmap") == [2, 5]
    figure = monitor.plot_neighbours("conv")  # the last RSMs are there all the same
    assert figure.axes


def test_without_a_logger_nothing_is_drawn(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"])
    fit(TinyNet(), loader, monitor, tmp_path, max_epochs=1)  # logger=False
    assert monitor._ranges == {} and len(monitor.history) == 1


def test_results_are_the_rsms_the_scores_came_from(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, LAYERS)
    assert monitor.rsms == {} and monitor.probe is None
    with pytest.raises(ValueError, match="history"):
        monitor.plot_history()
    fit(TinyNet(), loader, monitor, tmp_path, max_epochs=2)
    inputs, labels = monitor.probe
    assert torch.equal(inputs, probe[0]) and torch.equal(labels, probe[1])
    last = monitor.history[-1]
    rsms = monitor.rsms
    assert {layer: set(kinds) for layer, kinds in rsms.items()} == {
        layer: {"semantic", "baseline"} for layer in LAYERS
    }
    for layer, kinds in rsms.items():
        for kind, rsm in kinds.items():
            assert rsm.shape == (12, 12) and rsm.dtype == torch.float32 and rsm.device.type == "cpu"
            for score, value in rsm_scores(rsm, labels).items():
                assert last[f"rsm/{layer}/{kind}/{score}"] == pytest.approx(float(value)), score
    rsms["conv"]["semantic"].fill_(0.0)  # a copy: the monitor's own RSMs are untouched
    assert monitor.rsms["conv"]["semantic"].diagonal().gt(0.5).all()
    with pytest.raises(ValueError, match=r"one of \['conv', 'pool'\], but got 'head'"):
        monitor.plot_neighbours("head")


def test_plot_history_draws_the_history(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, LAYERS)
    fit(TinyNet(), loader, monitor, tmp_path, max_epochs=3)
    figure = monitor.plot_history()
    lines = [line for ax in figure.axes for line in ax.lines]
    drawn = {line.get_gid() for line in lines}
    expected = {
        f"{layer}/{kind}/{score}"
        for layer in LAYERS
        for kind in ("semantic", "baseline")
        for score in ("map", "precision@1", "recall@1", "probability_agreement")
    }
    assert expected | {f"{layer}/-/rsa_to_previous" for layer in LAYERS} <= drawn
    for line in lines:
        layer, kind, score = line.get_gid().split("/")
        key = {"-": f"rsm/{layer}/{score}"}.get(kind, f"rsm/{layer}/{kind}/{score}")
        key = "rsm/time_s" if score == "time_s" else key
        values = [row.get(key, float("nan")) for row in monitor.history]
        assert line.get_xdata().tolist() == [row["epoch"] for row in monitor.history]
        torch.testing.assert_close(
            torch.tensor(line.get_ydata(), dtype=torch.float64),
            torch.tensor(values, dtype=torch.float64),
            equal_nan=True,
        )
