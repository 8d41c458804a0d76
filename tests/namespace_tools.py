"""A tiny callback and model for either Lightning namespace, and a run with one namespace hidden.

``EpochRecorder`` demonstrates the declaration that ``RSMMonitor`` takes up: one class on
``CALLBACK_BASES`` that both ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer``
accept, with a ``state_key``, a checkpointed state and images sent to every logger.

Run as a script (``python tests/namespace_tools.py lightning``), it hides the named top-level
packages as if they were not installed, runs a tiny fit with the namespace that is left and
prints a JSON report; ``tests/test_namespaces.py`` reads it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if __name__ == "__main__":
    # Hide the packages before anything imports them (lightning_rsm included).

    class _Hide:
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
            if fullname.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {fullname!r} (hidden)", name=fullname)

    sys.meta_path.insert(0, _Hide(sys.argv[1:]))

from lightning_rsm.image_logging import log_images  # noqa: E402
from lightning_rsm.namespaces import CALLBACK_BASES, is_fitting  # noqa: E402

IMAGE_TAG = "rsm/demo/heatmap"


class EpochRecorder(*CALLBACK_BASES):
    """Records the epochs it saw and whether the Trainer was fitting; logs one image per epoch."""

    def __init__(self, name: str = "a", images: bool = False) -> None:
        self.name = name
        self.images = images
        self.epochs: list[int] = []
        self.fitting: list[bool] = []
        self.loaded: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append(trainer.current_epoch)
        self.fitting.append(is_fitting(trainer))
        if self.images and trainer.is_global_zero:
            image = np.full((6, 6, 3), 200, dtype=np.uint8)
            log_images(trainer.loggers, {IMAGE_TAG: image}, trainer.global_step)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.fitting.append(is_fitting(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = dict(state_dict)
        self.epochs = list(state_dict["epochs"])


def tiny_module(namespace: str) -> Any:
    """A linear classifier of 4 features into 2 classes, a LightningModule of ``namespace``."""
    base = importlib.import_module(namespace).LightningModule

    class Tiny(base):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def tiny_data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(8, 4, generator=generator), torch.arange(8) % 2


def tiny_trainer(namespace: str, root: str, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return importlib.import_module(namespace).Trainer(**kwargs)


def _report(root: str) -> dict[str, Any]:
    from lightning_rsm import namespaces

    (namespace,) = namespaces.importable_namespaces()
    loggers = importlib.import_module(f"{namespace}.loggers")
    csv = loggers.CSVLogger(root, name="csv")
    tensorboard = loggers.TensorBoardLogger(root, name="tb")
    recorder = EpochRecorder(images=True)
    loader = DataLoader(TensorDataset(*tiny_data()), batch_size=4)
    trainer = tiny_trainer(namespace, root, logger=[tensorboard, csv], callbacks=[recorder])
    trainer.fit(tiny_module(namespace), loader)
    report: dict[str, Any] = {
        "namespaces": list(namespaces.importable_namespaces()),
        "epochs": recorder.epochs,
        "pngs": sorted(os.listdir(os.path.join(csv.log_dir, "rsm"))),
        "tensorboard_events": any(
            name.startswith("events.") for name in os.listdir(tensorboard.log_dir)
        ),
        "caught_by_namespace": False,
    }
    try:
        raise namespaces.MisconfigurationException("bad option")
    except importlib.import_module(f"{namespace}.utilities.exceptions").MisconfigurationException:
        report["caught_by_namespace"] = True
    try:
        from lightning_rsm import RSMMonitor

        x, y = tiny_data()
        monitor = RSMMonitor((x, y), ["layer"], baseline=False)
        trainer = tiny_trainer(namespace, root, max_epochs=2, callbacks=[monitor])
        trainer.fit(tiny_module(namespace), loader)
        report["rsm_monitor_evaluations"] = len(monitor.history)
    except Exception as error:
        report["rsm_monitor_error"] = f"{type(error).__name__}: {error}"
    hidden = sys.argv[1:]
    report["hidden_imported"] = sorted(
        name for name in sys.modules if name.partition(".")[0] in hidden
    )
    return report


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as root:
        print(json.dumps(_report(root)))
