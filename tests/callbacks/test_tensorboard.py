"""RSMMonitor with a real Trainer and TensorBoardLogger: read the event files back."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNetWithVal, make_data, trainer_kwargs
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.cli import main
from lightning_rsm.demo import DEMO_LAYERS
from lightning_rsm.functional import (
    compare_rsms,
    probability_agreement,
    retrieval_average_precision,
    semantic_rsm,
    spatio_semantic_rsm,
)

LAYERS = ["conv", "pool"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs with validation (and its sanity check); the monitor and the event files."""
    tmp_path = tmp_path_factory.mktemp("tb")
    pl.seed_everything(0)
    images, labels = make_data(48)
    probe_x, probe_y = make_data(12, seed=1)
    target = torch.rand(12, 12)
    target = target + target.T
    monitor = RSMMonitor((probe_x, probe_y), LAYERS, targets={"random": target})
    model = TinyNetWithVal()
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, logger=logger, num_sanity_val_steps=1), callbacks=[monitor]
    )
    trainer.fit(model, loader, loader)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return model, monitor, events, (probe_x, probe_y, target)


@pytest.mark.oldest
def test_scalar_tags_and_one_value_per_epoch(run):
    _, monitor, events, _ = run
    tags = set(events.Tags()["scalars"])
    for layer in LAYERS:
        for kind in ("semantic", "baseline"):
            for score in ("map", "precision@1", "probability_agreement"):
                assert f"rsm/{layer}/{kind}/{score}" in tags
        assert f"rsm/{layer}/rsa_to_previous" in tags
        assert f"rsm/{layer}/vs_random" in tags
    assert "rsm/time_s" in tags
    # two epochs, no evaluation in the sanity check
    assert [row["epoch"] for row in monitor.history] == [0, 1]
    assert len(events.Scalars("rsm/conv/semantic/map")) == 2
    assert len(events.Scalars("rsm/conv/rsa_to_previous")) == 1


def test_scalar_values_are_in_range_and_match_history(run):
    _, monitor, events, _ = run
    for tag in events.Tags()["scalars"]:
        if not tag.startswith("rsm/"):
            continue
        values = [event.value for event in events.Scalars(tag)]
        logged = [row[tag] for row in monitor.history if tag in row]
        np.testing.assert_allclose(values, logged, rtol=1e-6)
        if tag.endswith(("/map", "/precision@1")):
            assert all(0.0 <= v <= 1.0 for v in values), tag
        elif tag == "rsm/time_s":
            assert all(v > 0 for v in values)
        else:
            assert all(-1.0 <= v <= 1.0 for v in values), tag


@pytest.mark.oldest
def test_logged_scores_equal_a_direct_computation(run):
    model, monitor, _, (probe_x, probe_y, target) = run
    model.eval()
    with torch.no_grad():
        features = {"conv": model.conv(probe_x)}
        features["pool"] = model.pool(features["conv"])
        logits = model(probe_x)
    last = monitor.history[-1]
    for layer, x in features.items():
        sem = semantic_rsm(x, kernel="cosine")
        base = spatio_semantic_rsm(x, kernel="cosine")
        expected = {
            "semantic/map": retrieval_average_precision(sem, probe_y),
            "baseline/map": retrieval_average_precision(base, probe_y),
            "semantic/probability_agreement": probability_agreement(sem, logits),
            "baseline/probability_agreement": probability_agreement(base, logits),
            "vs_random": compare_rsms(sem, target),
        }
        for key, value in expected.items():
            assert last[f"rsm/{layer}/{key}"] == pytest.approx(float(value), abs=1e-5), key


def test_figures_are_written_once_per_evaluation_at_the_scalars_step(run):
    _, monitor, events, _ = run
    tags = set(events.Tags()["images"])
    per_layer = {f"rsm/{layer}/{name}" for layer in LAYERS for name in ("heatmap", "neighbours")}
    assert per_layer | {"rsm/layer_rsa", "rsm/history"} == tags
    steps = [event.step for event in events.Scalars("rsm/conv/semantic/map")]
    for tag in tags - {"rsm/history"}:
        assert [image.step for image in events.Images(tag)] == steps
    # the trajectories once, at fit end, at the last evaluation's step
    assert [image.step for image in events.Images("rsm/history")] == steps[-1:]
    for tag in tags:
        image = np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)))
        assert image.ndim == 3 and min(image.shape[:2]) >= 200, tag
    assert set(monitor._ranges) == set(LAYERS)
    assert monitor.layer_rsa.shape == (2, 2)
    assert torch.equal(monitor.layer_rsa, monitor.layer_rsa.T)


# ------------------------------------------------------------------ the real TensorBoard server


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory):
    """A short `lightning-rsm demo` run: its log folder and what it printed."""
    log_dir = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(
            [
                "demo",
                "--epochs",
                "2",
                "--per-class",
                "3",
                "--train-size",
                "96",
                "--log-dir",
                str(log_dir),
            ]
        )
    assert status == 0
    return log_dir, out.getvalue()


@pytest.mark.oldest
def test_demo_prints_a_row_per_epoch_and_layer(demo_logs):
    _, printed = demo_logs
    rows = [line.split() for line in printed.splitlines() if line[:5].strip().isdigit()]
    assert [(row[0], row[1]) for row in rows] == [
        (str(epoch), layer) for epoch in (0, 1) for layer in DEMO_LAYERS
    ]
    for row in rows:
        assert all(-1.0 <= float(value) <= 1.0 for value in row[2:])


RUN = "version_0"  # the demo logs each run to <log-dir>/version_<n>


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_tensorboard_server_serves_the_scalars_and_images(demo_logs):
    log_dir, _ = demo_logs
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(log_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = None
        lines = []
        while base is None:
            line = server.stdout.readline()
            assert line, f"tensorboard exited: {''.join(lines)}"
            lines.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            base = found.group(1) if found else None
        deadline = time.monotonic() + 60
        tags = {}
        while not tags.get(RUN) and time.monotonic() < deadline:
            tags = json.loads(_get(f"{base}/data/plugin/scalars/tags"))
            time.sleep(0.5)
        scalar_tags = set(tags[RUN])
        for layer in DEMO_LAYERS:
            assert {f"rsm/{layer}/semantic/map", f"rsm/{layer}/baseline/map"} <= scalar_tags
        query = urllib.parse.urlencode({"run": RUN, "tag": "rsm/block2/semantic/map"})
        points = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert len(points) == 2  # [wall_time, step, value] per epoch
        assert all(0.0 <= value <= 1.0 for _, _, value in points)

        image_tags = json.loads(_get(f"{base}/data/plugin/images/tags"))[RUN]
        assert "rsm/block2/heatmap" in image_tags
        query = urllib.parse.urlencode({"run": RUN, "tag": "rsm/block2/heatmap"})
        meta = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
        assert len(meta) == 2
        png = _get(f"{base}/data/plugin/images/individualImage?{meta[-1]['query']}")
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size[0] >= 256
    finally:
        server.terminate()
        server.wait(timeout=30)
