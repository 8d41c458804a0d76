"""RSMMonitor configured from a LightningCLI YAML: every option, callables by import path."""

from __future__ import annotations

import sys

import pytest
import yaml
from helpers.cli_objects import ProbeDataset, pick_logits

from lightning_rsm import RSMMonitor

cli = pytest.importorskip("lightning.pytorch.cli")

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

CONFIG = {
    "trainer": {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "lightning_rsm.RSMMonitor",
                "init_args": {
                    "probe": {"class_path": "helpers.cli_objects.ProbeDataset"},
                    "layers": ["block"],
                    "every_n_epochs": 1,
                    "input_fn": 0,
                    "label_fn": 1,
                    "logits_fn": "helpers.cli_objects.pick_logits",
                    "forward_fn": "helpers.cli_objects.call_model",
                    "kernel": "inner",
                    "log_images": False,
                },
            }
        ],
    },
    "model": {"class_path": "helpers.cli_objects.TupleNet"},
}


@pytest.fixture(autouse=True)
def _no_pytest_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # as from the command line: only the YAML


def _cli(tmp_path, config):
    config = {**config, "trainer": {**config["trainer"], "default_root_dir": str(tmp_path)}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli.LightningCLI(args=["--config", str(path)], run=False)


def test_the_callback_configures_from_yaml_with_functions_by_import_path(tmp_path):
    parsed = _cli(tmp_path, CONFIG)
    (monitor,) = [c for c in parsed.trainer.callbacks if isinstance(c, RSMMonitor)]
    assert monitor.config.logits_fn is pick_logits
    assert monitor.config.input_fn == 0 and monitor.config.label_fn == 1
    assert isinstance(monitor.config.probe, ProbeDataset)
    parsed.trainer.fit(parsed.model)
    (row,) = monitor.history
    assert 0.0 <= row["rsm/block/semantic/map"] <= 1.0
    assert "rsm/block/semantic/probability_agreement" in row  # the logits came through


def test_a_bad_value_names_itself_in_one_line(tmp_path):
    config = yaml.safe_load(yaml.safe_dump(CONFIG))
    config["trainer"]["callbacks"][0]["init_args"]["every_n_epochs"] = 0
    with pytest.raises(ValueError) as error:
        _cli(tmp_path, config)
    # jsonargparse lists what each type of `trainer.callbacks` made of the value; ours is one line
    lines = [line.strip(" -") for line in str(error.value).splitlines()]
    assert "Expected `every_n_epochs` to be a positive int or None, but got 0." in lines
