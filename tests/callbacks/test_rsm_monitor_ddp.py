"""RSMMonitor under DDP (2 gloo processes, Lightning's ddp_spawn): the one-process scores,
images written once, and an evaluation that fails on one rank skipped on every rank."""

from __future__ import annotations

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, trainer_kwargs
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.functional import (
    probability_agreement,
    retrieval_average_precision,
    retrieval_precision,
    semantic_rsm,
    spatio_semantic_rsm,
)

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest


@pytest.mark.parametrize("background", [False, True])
def test_ddp_two_gloo_processes_log_the_one_process_scores_and_images_once(
    data, probe, tmp_path, background
):
    """Each rank runs the probe; semantic_rsm splits its pairs across the 2 ranks (with
    ``background``, on each rank's worker, in a gloo group of the workers' own)."""
    pl.seed_everything(0)
    model = TinyNet()
    monitor = RSMMonitor(probe, ["conv", "pool"], background=background)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        callbacks=[monitor],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, logger=logger),
    )
    trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=8))
    # ddp_spawn hands rank 0's final weights and callback metrics back to this process
    model.eval()
    x, y = probe
    with torch.no_grad():
        features = {"conv": model.conv(x)}
        features["pool"] = model.pool(features["conv"])
        logits = model(x)
    for layer, feats in features.items():
        for kind, rsm in (
            ("semantic", semantic_rsm(feats)),
            ("baseline", spatio_semantic_rsm(feats)),
        ):
            expected = {
                "map": retrieval_average_precision(rsm, y),
                "precision@1": retrieval_precision(rsm, y, k=1),
                "probability_agreement": probability_agreement(rsm, logits),
            }
            for score, value in expected.items():
                logged = trainer.callback_metrics[f"rsm/{layer}/{kind}/{score}"]
                assert float(logged) == pytest.approx(float(value), abs=1e-5)
    assert "rsm/conv/rsa_to_previous" in trainer.callback_metrics
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert len(events.Images("rsm/conv/heatmap")) == 2  # one per epoch, not per rank
    assert len(events.Images("rsm/history")) == 1  # at fit end, once


class PoisonedOnRankOne(TinyNet):
    """On rank 1 only, the probe forward of epoch 1 (the second evaluation) gives NaN."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.current_epoch == 1 and self.global_rank == 1:
            x = x * math.nan
        return super().forward(x)


class SaveWhatEachRankSaw(Callback):
    """Writes each rank's monitor history and warnings to ``folder/rank<r>.pt``."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_fit_start(self, trainer, pl_module) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._warnings = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._catcher.__exit__(None, None, None)
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, RSMMonitor))
        messages = [str(w.message) for w in self._warnings]
        torch.save(
            {
                "history": monitor.history,
                "warnings": [m for m in messages if "RSMMonitor" in m],
                "sync_dist": [m for m in messages if "sync_dist" in m],
                "epochs": trainer.current_epoch,
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.parametrize("background", [False, True])
def test_an_evaluation_failing_on_one_rank_is_skipped_on_every_rank(
    data, probe, tmp_path, background
):
    monitor = RSMMonitor(probe, ["conv"], background=background)
    trainer = pl.Trainer(
        callbacks=[monitor, SaveWhatEachRankSaw(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=3),
    )
    trainer.fit(PoisonedOnRankOne(), DataLoader(TensorDataset(*data), batch_size=8))
    seen = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank_saw in seen:
        assert rank_saw["epochs"] == 3  # both ranks finished the fit
        assert [row["epoch"] for row in rank_saw["history"]] == [0, 2]
    untimed = [
        [{k: v for k, v in row.items() if k != "rsm/time_s"} for row in rank_saw["history"]]
        for rank_saw in seen
    ]
    assert untimed[0] == untimed[1]
    # rank 0 warns (rank_zero_warn) about rank 1's failure; rank 1 stays quiet. The one cost
    # warning ("monitoring adds ...") depends on the machine's load: it is not counted here.
    failures = [m for m in seen[0]["warnings"] if "monitoring adds" not in m]
    assert len(failures) == 1
    assert "evaluation at epoch 1 failed and was skipped on rank 1" in failures[0]
    assert "to be finite" in failures[0]
    assert seen[1]["warnings"] == []


@pytest.mark.parametrize("background", [False, True])
def test_ddp_logs_the_rank_independent_scores_without_a_sync_dist_warning(
    data, probe, tmp_path, background
):
    """The scores are the same on every rank by construction; they reach
    ``trainer.callback_metrics`` and the loggers directly, never Lightning's epoch reduction,
    which warns once per key logged without ``sync_dist=True``."""
    monitor = RSMMonitor(probe, ["conv", "pool"], background=background)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        callbacks=[monitor, SaveWhatEachRankSaw(tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, logger=logger),
    )
    trainer.fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=8))
    seen = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank_saw in seen:
        assert len(rank_saw["history"]) == 2
        assert rank_saw["sync_dist"] == []
    assert "rsm/pool/semantic/map" in trainer.callback_metrics
