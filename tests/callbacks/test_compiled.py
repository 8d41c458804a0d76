"""RSMMonitor on a ``torch.compile``'d model: hooks inside the compiled region, no recompilation."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from conftest import TinyNet, trainer_kwargs
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor


class CompiledBodyNet(TinyNet):
    """TinyNet whose conv block is compiled with ``backend``."""

    def __init__(self, backend) -> None:
        super().__init__(dropout=0.5)
        self.conv = torch.compile(self.conv, backend=backend)


def test_a_compiled_submodule_is_monitored_without_recompiling_training(data, probe, tmp_path):
    """Hooks on modules inside the compiled region, named as in the uncompiled model."""

    def train(monitor: RSMMonitor | None) -> tuple[int, dict[str, Tensor]]:
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        pl.seed_everything(0)
        model = CompiledBodyNet(counting_backend)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=16, shuffle=True))
        return len(graphs), model.state_dict()

    monitor = RSMMonitor(probe, ["conv.1", "pool"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no recompilation or graph-break warning
        graphs_with, weights_with = train(monitor)
    graphs_without, weights_without = train(None)
    assert graphs_with == graphs_without == 1
    assert [row["epoch"] for row in monitor.history] == [0, 1]
    for name, value in weights_without.items():
        assert torch.equal(weights_with[name], value), name
