"""One fit of a real Trainer with an ``RSMMonitor``, and the history's comparable part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from conftest import trainer_kwargs


def fit(
    model: pl.LightningModule,
    loader: Any,
    monitor: pl.Callback | None,
    tmp_path: Any,
    val: Any = None,
    callbacks: Sequence[pl.Callback] = (),
    ckpt_path: Any = None,
    **overrides: Any,
) -> pl.Trainer:
    """``Trainer(callbacks=[monitor, *callbacks], **trainer_kwargs(tmp_path, **overrides))``
    fitted on ``loader`` (and ``val``)."""
    first = [monitor] if monitor is not None else []
    trainer = pl.Trainer(callbacks=[*first, *callbacks], **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader, val, ckpt_path=ckpt_path)
    return trainer


def untimed(history: list[dict]) -> list[dict]:
    """A monitor's history without ``rsm/time_s``, the one entry that differs between runs."""
    return [{k: v for k, v in row.items() if k != "rsm/time_s"} for row in history]
