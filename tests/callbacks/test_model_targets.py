"""Reference networks as RSMMonitor targets: ``(model, "layer")`` and callables, computed once at
fit start with the monitor's settings, logged as ``rsm/<layer>/vs_<name>``."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from helpers.fit import fit, untimed
from jsonargparse import ArgumentParser
from torch import Tensor

from lightning_rsm import RSMMonitor
from lightning_rsm.targets import reference_rsm

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest


def pixels(inputs: Any) -> Tensor:
    """A reference 'network' given as a callable: the raw pixels."""
    return inputs.flatten(1)


def test_model_and_callable_targets_log_what_their_reference_rsms_given_directly_log(
    loader, probe, tmp_path
):
    x, _ = probe
    torch.manual_seed(1)
    teacher = TinyNet()
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    options = {"max_positions": 16, "kernel": "cosine"}
    networks = {"teacher": (teacher, "conv"), "pixels": pixels}
    tensors = {name: reference_rsm(net, x, **options) for name, net in networks.items()}
    histories = []
    for targets in (networks, tensors):
        monitor = RSMMonitor(probe, ["conv", "pool"], targets=targets, **options)
        pl.seed_everything(0)
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=2)
        histories.append(untimed(monitor.history))
    assert histories[0] == histories[1]
    assert {"rsm/pool/vs_teacher", "rsm/conv/vs_pixels"} <= set(histories[0][0])
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, before[name]) for name, p in teacher.state_dict().items())


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ((TinyNet(), "layer4"), r"^`targets\['t'\]`: Expected `layers` to be names .*'conv'"),
        (lambda inputs: inputs[:1], r"^`targets\['t'\]`: Expected the reference callable to"),
    ],
)
def test_a_reference_network_that_does_not_fit_fails_at_fit_start_naming_it(
    loader, probe, tmp_path, target, match
):
    monitor = RSMMonitor(probe, ["conv"], targets={"t": target})
    with pytest.raises(ValueError, match=match) as error:
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=1)
    assert "\n" not in str(error.value) and monitor.history == []


def test_lightning_cli_reads_a_function_target_and_the_archive_options():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RSMMonitor, "monitor")
    args = ["--monitor.layers=[conv]", "--monitor.targets={pixels: test_model_targets.pixels}"]
    args += ["--monitor.save_rsms=true", "--monitor.save_every=null", "--monitor.save_last=3"]
    monitor = parser.instantiate_classes(parser.parse_args(args)).monitor
    assert monitor.config.targets == {"pixels": pixels}
    assert (monitor.config.save_rsms, monitor.config.save_every, monitor.config.save_last) == (
        True,
        None,
        3,
    )
