"""``MonitorConfig``: every option of RSMMonitor checked at construction, one error per bad
value or type, raised before anything runs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.config import MonitorConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "`layers`"),
        ({"layers": "conv"}, "`layers`"),
        ({"layers": ["conv", 3]}, "`layers`"),
        ({"layers": ["conv", "conv"]}, "each name once"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
        ({"every_n_epochs": 1.5}, "`every_n_epochs`"),
        ({"every_n_epochs": True}, "`every_n_epochs`"),
        ({"kernel": "linear"}, r"`kernel` to be one of \['cosine', 'inner', 'rbf'\]"),
        ({"matcher": "hungarian"}, "`matcher` to be one of"),
        ({"method": "cosine"}, "`method` to be one of"),
        ({"sigma": -1.0}, "`sigma`"),
        ({"window": 0}, "`window`"),
        ({"tol": 0.0}, "`tol`"),
        ({"max_positions": 0}, "`max_positions`"),
        ({"batch_size": -1}, "`batch_size`"),
        ({"heatmap_range": (1.0, 0.0)}, "`heatmap_range`"),
        ({"heatmap_range": (0.0, math.inf)}, "`heatmap_range`"),
        ({"solver_threads": 0}, "`solver_threads` to be a positive int or None, but got 0"),
        ({"warm_start_bytes": -1}, "`warm_start_bytes` to be a non-negative int, but got -1"),
        ({"probe_size": 1}, "`probe_size` to be an int of at least 2, but got 1"),
        ({"save_every": 0}, "`save_every` to be a positive int or None, but got 0"),
        ({"save_last": None}, "`save_last` to be a positive int, but got None"),
    ],
)
def test_constructor_rejects_bad_values(probe, kwargs, match):
    kwargs = {"layers": ["conv"], **kwargs}
    with pytest.raises(MisconfigurationException, match=match):
        RSMMonitor(probe, **kwargs)


def test_probe_ids_need_a_given_probe():
    with pytest.raises(MisconfigurationException, match="`probe_ids` only with a given `probe`"):
        RSMMonitor(None, ["conv"], probe_ids=["a", "b"])


@pytest.mark.parametrize(
    ("probe_arg", "kwargs", "error", "match"),
    [
        ("not a probe", {}, TypeError, "`probe` to be a DataLoader"),
        ([1, 2], {}, TypeError, r"tuple \(inputs, labels\) of tensors"),
        ("tuple", {"targets": [torch.eye(12)]}, TypeError, "`targets` to be a mapping"),
        (
            "tuple",
            {"targets": {"t": np.eye(12)}},
            TypeError,
            r"`targets\['t'\]` to be an RSM tensor",
        ),
        ("tuple", {"targets": {"t": torch.ones(12, 11)}}, ValueError, "square matrix"),
        (
            "tuple",
            {"targets": {"t": torch.full((12, 12), float("nan"))}},
            ValueError,
            r"`targets\['t'\]` to hold finite values, but it has 144 NaN or Inf entries",
        ),
        (
            "tuple",
            {"targets": {"teacher": (torch.nn.Linear(2, 2), 4)}},
            TypeError,
            r"`targets\['teacher'\]` to be an RSM tensor.*but got a tuple \(Linear, int\)",
        ),
        ("tuple", {"save_rsms": 1}, TypeError, "`save_rsms` to be True or False, but got 1"),
        ("tuple", {"probe_ids": [0.5] * 12}, TypeError, "`probe_ids` to be None, a list of str"),
        ("tuple", {"probe_ids": ["a", 1]}, TypeError, "`probe_ids` to be None, a list of str"),
        ("tuple", {"probe_ids": "abc"}, TypeError, "`probe_ids` to be None, a list of str"),
        ("tuple", {"logits_fn": 3}, TypeError, "`logits_fn` to be callable"),
        ("tuple", {"baseline": "no"}, TypeError, "`baseline` to be True or False, but got 'no'"),
        ("tuple", {"log_images": "never"}, TypeError, "`log_images` to be True or False"),
        ("tuple", {"background": "yes"}, TypeError, "`background` to be True or False"),
        ("mislabelled", {}, ValueError, r"`labels` to have shape \(12,\)"),
        ("float labels", {}, TypeError, "integer or bool dtype, but got torch.float32"),
        ("single", {}, ValueError, "at least 2 samples"),
    ],
)
def test_constructor_rejects_bad_probe_targets_and_types(probe, probe_arg, kwargs, error, match):
    x, y = probe
    probes = {
        "tuple": (x, y),
        "mislabelled": (x, y[:5]),
        "float labels": (x, y.float()),
        "single": (x[:1],),
    }
    probe_arg = tuple(probe_arg) if isinstance(probe_arg, list) else probe_arg
    with pytest.raises(error, match=match):
        RSMMonitor(probes.get(probe_arg, probe_arg), ["conv"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_epochs": 2, "every_n_train_steps": 5}, MisconfigurationException, "only one"),
        ({"every_n_train_steps": 0}, MisconfigurationException, "`every_n_train_steps`"),
        ({"probe_size": 1}, MisconfigurationException, "`probe_size` to be an int of at least 2"),
        ({"tokens": "cls"}, MisconfigurationException, "`tokens` to be one of"),
        ({"special_tokens": -1}, MisconfigurationException, "`special_tokens`"),
        ({"token_grid": (0, 3)}, MisconfigurationException, "`token_grid`"),
        ({"input_fn": 1.5}, TypeError, "`input_fn` to be None, a key"),
        ({"forward_fn": "forward"}, TypeError, "`forward_fn` to be None or callable"),
    ],
)
def test_constructor_rejects_bad_schedule_batch_and_token_options(probe, kwargs, error, match):
    with pytest.raises(error, match=match):
        RSMMonitor(probe, ["conv"], **kwargs)


def test_the_config_is_frozen_normalised_and_read_by_the_monitor(probe):
    target = torch.eye(12, dtype=torch.float64)
    monitor = RSMMonitor(
        probe, ["conv", "pool"], heatmap_range=(0, 1), targets={"t": target}, solver_threads=2
    )
    config = monitor.config
    assert config.layers == ("conv", "pool") and monitor.layers == ["conv", "pool"]
    assert config.every_n_epochs == 1 and config.every_n_train_steps is None
    assert config.heatmap_range == (0.0, 1.0) and config.solver_threads == 2
    assert config.targets["t"].dtype == torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kernel = "inner"  # type: ignore[misc]


def test_every_option_of_the_monitor_is_a_field_of_the_config():
    import inspect

    options = set(inspect.signature(RSMMonitor).parameters)
    assert options == {field.name for field in dataclasses.fields(MonitorConfig)}
