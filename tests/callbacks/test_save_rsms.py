"""RSMMonitor(save_rsms=True) with real Trainers: one archive file per delivered evaluation, the
RSMs that were scored, bounded, the same in the background, continued by a resumed run."""

from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, TinyNetWithVal, make_data, trainer_kwargs
from helpers.fit import fit
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor, load_rsms, probe_fingerprint
from lightning_rsm.functional import compare_rsms, jensen_shannon_similarity, rsm_scores
from lightning_rsm.targets import reference_rsm

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

LAYERS = ["conv", "pool"]


def saved_fit(monitor, loader, root, **overrides) -> pl.Trainer:
    pl.seed_everything(0)
    return fit(TinyNet(), loader, monitor, root, **overrides)


def test_each_evaluation_is_saved_at_its_history_step_with_the_rsms_it_was_scored_with(
    loader, probe, tmp_path
):
    x, y = probe
    ids = [f"img{i:02d}.png" for i in range(12)]
    monitor = RSMMonitor(probe, LAYERS, save_rsms=True, probe_ids=ids)
    logger = CSVLogger(tmp_path, name="run", version=0)
    saved_fit(monitor, loader, tmp_path, max_epochs=3, logger=logger)
    archive = load_rsms(tmp_path / "run" / "version_0" / "rsms")
    assert [(e.step, e.epoch) for e in archive] == [
        (r["step"], r["epoch"]) for r in monitor.history
    ]
    assert [e.evaluation for e in archive] == [0, 1, 2]
    for evaluation, row in zip(archive, monitor.history, strict=True):
        assert evaluation.layers == LAYERS and evaluation.ids == ids
        assert torch.equal(evaluation.labels, y)
        assert evaluation.fingerprint == probe_fingerprint(x, y)
        assert evaluation.settings["kernel"] == "cosine" and evaluation.settings["baseline"]
        agreement = jensen_shannon_similarity(evaluation.logits.double())
        for layer, kinds in evaluation.rsms.items():
            assert sorted(kinds) == ["baseline", "semantic"]
            for kind, rsm in kinds.items():
                scores = rsm_scores(rsm, y, output_similarity=agreement)
                for score, value in scores.items():  # the very numbers logged
                    assert float(value) == row[f"rsm/{layer}/{kind}/{score}"], (layer, kind)
    for layer in LAYERS:  # the last evaluation's RSMs, bit for bit
        assert torch.equal(archive[-1].rsms[layer]["semantic"], monitor.rsms[layer]["semantic"])


def test_without_a_logger_dir_the_archive_is_in_the_default_root_dir(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], save_rsms=True, baseline=False)
    saved_fit(monitor, loader, tmp_path, max_epochs=1)
    (evaluation,) = load_rsms(tmp_path / "rsms")
    assert list(evaluation.rsms["conv"]) == ["semantic"] and evaluation.ids is None


def test_nothing_is_saved_by_default(loader, probe, tmp_path):
    saved_fit(RSMMonitor(probe, ["conv"]), loader, tmp_path, max_epochs=1)
    assert not (tmp_path / "rsms").exists()


@pytest.mark.parametrize(
    ("bounds", "kept"),
    [
        ({"save_every": 2, "save_last": 1}, [0, 2, 4]),
        ({"save_every": None, "save_last": 2}, [3, 4]),
    ],
)
def test_save_every_and_save_last_bound_the_archive(loader, probe, tmp_path, bounds, kept):
    monitor = RSMMonitor(probe, ["conv"], save_rsms=True, **bounds)
    saved_fit(monitor, loader, tmp_path, max_epochs=5)
    archive = load_rsms(tmp_path)
    assert [e.evaluation for e in archive] == kept
    assert [e.step for e in archive] == [monitor.history[i]["step"] for i in kept]


@pytest.mark.parametrize("val", [False, True])
def test_background_saves_the_synchronous_archive_bit_for_bit(data, probe, tmp_path, val):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    archives = {}
    for background in (False, True):
        root = tmp_path / f"background={background}"
        monitor = RSMMonitor(probe, LAYERS, save_rsms=True, background=background)
        pl.seed_everything(0)
        model = TinyNetWithVal() if val else TinyNet()
        fit(model, loader, monitor, root, val=loader if val else None, max_epochs=3)
        archives[background] = load_rsms(root)
    sync, background = archives[False], archives[True]
    assert [(e.step, e.epoch) for e in background] == [(e.step, e.epoch) for e in sync]
    for a, b in zip(sync, background, strict=True):
        assert torch.equal(a.logits, b.logits)
        for layer in LAYERS:
            for kind in ("semantic", "baseline"):
                assert torch.equal(a.rsms[layer][kind], b.rsms[layer][kind]), (layer, kind)


def test_a_run_resumed_from_an_earlier_checkpoint_rewrites_and_equals_a_straight_run(
    data, probe, tmp_path
):
    """The resumed run evaluates epochs 1 and 2 again: their files are replaced, not doubled."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(root, max_epochs, ckpt_path=None, callbacks=()) -> RSMMonitor:
        monitor = RSMMonitor(probe, LAYERS, save_rsms=True)
        pl.seed_everything(0)
        fit(
            TinyNet(),
            loader,
            monitor,
            root,
            callbacks=callbacks,
            ckpt_path=ckpt_path,
            max_epochs=max_epochs,
            enable_checkpointing=bool(callbacks),
        )
        return monitor

    straight = run(tmp_path / "straight", 4)
    saver = ModelCheckpoint(tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    run(tmp_path / "split", 3, callbacks=[saver])
    assert len(load_rsms(tmp_path / "split")) == 3
    run(tmp_path / "split", 4, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    expected, got = load_rsms(tmp_path / "straight"), load_rsms(tmp_path / "split")
    assert [(e.step, e.epoch, e.evaluation) for e in got] == [
        (e.step, e.epoch, e.evaluation) for e in expected
    ]
    assert [e.step for e in got] == [row["step"] for row in straight.history]
    for a, b in zip(expected, got, strict=True):
        for layer in LAYERS:
            for kind in ("semantic", "baseline"):
                torch.testing.assert_close(
                    b.rsms[layer][kind], a.rsms[layer][kind], atol=1e-5, rtol=0
                )


def test_an_archive_of_another_probe_in_the_folder_fails_at_fit_start(loader, probe, tmp_path):
    saved_fit(RSMMonitor(probe, ["conv"], save_rsms=True), loader, tmp_path, max_epochs=1)
    other = RSMMonitor(make_data(12, seed=2), ["conv"], save_rsms=True)
    with pytest.raises(MisconfigurationException, match="holds one of another probe"):
        saved_fit(other, loader, tmp_path, max_epochs=1)
    assert other.history == [] and len(load_rsms(tmp_path)) == 1


def test_probe_ids_of_another_length_fail_at_fit_start(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], save_rsms=True, probe_ids=list(range(5)))
    with pytest.raises(ValueError, match="`probe_ids` to hold 12 ids, one per probe sample"):
        saved_fit(monitor, loader, tmp_path, max_epochs=1)


class BlockArchive(Callback):
    """From epoch 1 on, a file stands where the archive folder was: writes fail."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            shutil.rmtree(self.folder)
            self.folder.write_text("not a folder")


def test_a_failed_write_is_a_warning_and_training_goes_on(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], save_rsms=True)
    with pytest.warns(UserWarning, match="could not save the RSMs of step 6 to .*training goes on"):
        saved_fit(
            monitor, loader, tmp_path, max_epochs=3, callbacks=[BlockArchive(tmp_path / "rsms")]
        )
    assert [row["epoch"] for row in monitor.history] == [0, 1, 2]


class LoggerPerRank(Callback):
    """Gives each rank a logger of its own folder, so that a file written by any rank shows."""

    def __init__(self, root) -> None:
        self.root = root

    def setup(self, trainer, pl_module, stage) -> None:
        folder = self.root / f"rank{trainer.global_rank}"
        trainer.loggers = [CSVLogger(folder, name="", version="")]


def test_ddp_rank_zero_alone_saves_and_a_model_target_is_the_reference_rsm(data, probe, tmp_path):
    """2 gloo processes (ddp_spawn): rank 0's folder holds the archive, rank 1's none; the
    teacher's RSM, computed by rank 0 and broadcast, is the one ``reference_rsm`` gives."""
    pl.seed_everything(0)
    teacher = TinyNet()
    x, y = probe
    monitor = RSMMonitor(probe, LAYERS, save_rsms=True, targets={"teacher": (teacher, "conv")})
    trainer = pl.Trainer(
        callbacks=[LoggerPerRank(tmp_path), monitor],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2),
    )
    trainer.fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=8))
    assert not (tmp_path / "rank1" / "rsms").exists()
    archive = load_rsms(tmp_path / "rank0")
    assert [e.epoch for e in archive] == [0, 1]
    target = reference_rsm((teacher, "conv"), x)
    expected = compare_rsms(archive[-1].rsms["pool"]["semantic"], target, method="spearman")
    got = trainer.callback_metrics["rsm/pool/vs_teacher"]  # rank 0's, handed back by the spawn
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
