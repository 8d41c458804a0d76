"""Tiny models and data shared by the callback, TensorBoard and CLI tests."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def _tiny_net_classes(namespace: str) -> tuple[type, type]:
    """TinyNet and TinyNetWithVal as LightningModules of ``namespace``."""
    base = importlib.import_module(namespace).LightningModule

    class TinyNet(base):
        """conv + batch norm (4 x 8 x 8) -> pool (4 x 4 x 4) -> dropout -> linear head, 3 logits."""

        def __init__(self, dropout: float = 0.0) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.drop(self.pool(self.conv(x)).flatten(1)))

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class TinyNetWithVal(TinyNet):
        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("val_loss", loss)
            return loss

    # module-level names, so that ddp_spawn can pickle the models
    suffix = "" if namespace == "pytorch_lightning" else "_" + namespace.replace(".", "_")
    for cls in (TinyNet, TinyNetWithVal):
        cls.__name__ = cls.__qualname__ = cls.__name__ + suffix
        globals()[cls.__name__] = cls
    return TinyNet, TinyNetWithVal


NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
TINY_NETS = {namespace: _tiny_net_classes(namespace) for namespace in NAMESPACES}
TinyNet, TinyNetWithVal = TINY_NETS["pytorch_lightning"]


def make_data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images (n, 1, 8, 8) whose class (0, 1, 2) is a bright bar at a random place."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.1 * torch.rand(n, 1, 8, 8, generator=generator)
    shifts = torch.randint(0, 6, (n,), generator=generator)
    for i, (label, shift) in enumerate(zip(labels.tolist(), shifts.tolist(), strict=True)):
        if label == 0:
            images[i, 0, shift, :] += 1.0  # horizontal bar
        elif label == 1:
            images[i, 0, :, shift] += 1.0  # vertical bar
        else:
            images[i, 0, shift : shift + 3, shift : shift + 3] += 1.0  # square
    return images, labels


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    return make_data()


@pytest.fixture
def probe() -> tuple[Tensor, Tensor]:
    return make_data(12, seed=1)


@pytest.fixture
def loader(data) -> DataLoader:
    return DataLoader(TensorDataset(*data), batch_size=16)


class EvaluationFaults:
    """What :func:`evaluation_faults` injects into ``Evaluator.run``, by the evaluation's epoch:
    ``fail[epoch] = error`` raises it; ``hold = epoch`` waits until :meth:`release`."""

    def __init__(self) -> None:
        self.fail: dict[int, BaseException] = {}
        self.hold: int | None = None
        self.gate = threading.Event()

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def evaluation_faults(monkeypatch) -> EvaluationFaults:
    """Faults in the computation of an evaluation (inline or on the background worker)."""
    from lightning_rsm.callbacks.evaluation import Evaluator

    faults = EvaluationFaults()
    run = Evaluator.run

    def faulty_run(self, evaluation, *args, **kwargs):
        if evaluation.epoch in faults.fail:
            raise faults.fail[evaluation.epoch]
        if evaluation.epoch == faults.hold:
            faults.gate.wait(timeout=120)  # a guard against a hang, not a measurement
        return run(self, evaluation, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "run", faulty_run)
    yield faults
    faults.release()
