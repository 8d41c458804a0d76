"""RSMMonitor with real Trainers: configuration, evaluation schedule, side effects, resume."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, TinyNetWithVal, trainer_kwargs
from helpers.fit import fit, untimed
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.probe import untouched
from lightning_rsm.functional import (
    retrieval_average_precision,
    semantic_rsm,
    spatio_semantic_rsm,
)

# ------------------------------------------------------------------ fit-start validation


@pytest.mark.oldest
def test_unknown_layer_fails_at_fit_start_listing_the_valid_names(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv", "features.0"])
    with pytest.raises(MisconfigurationException, match=r"\['features.0'\].*'conv', 'conv.0'"):
        fit(TinyNet(), loader, monitor, tmp_path)


def test_float_class_ids_in_a_loader_fail_at_fit_start(loader, probe, tmp_path):
    x, y = probe
    monitor = RSMMonitor(DataLoader(TensorDataset(x, y.float()), batch_size=5), ["conv"])
    with pytest.raises(TypeError, match="integer or bool dtype, but got torch.float32"):
        fit(TinyNet(), loader, monitor, tmp_path)
    assert monitor.history == []


def test_target_of_another_size_fails_at_fit_start(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], targets={"human": torch.eye(5)})
    with pytest.raises(ValueError, match=r"`targets\['human'\]` to have shape \(12, 12\)"):
        fit(TinyNet(), loader, monitor, tmp_path)


class Unsqueeze(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


class FiveDimNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = Unsqueeze()

    def forward(self, x: Tensor) -> Tensor:
        self.extra(x)
        return super().forward(x)


def test_layer_output_of_a_bad_shape_fails_at_fit_start(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["extra"])
    with pytest.raises(ValueError, match=r"`extra` to be representations.*\(2, 1, 1, 8, 8\)"):
        fit(FiveDimNet(), loader, monitor, tmp_path)


def test_layer_that_never_runs_fails_at_fit_start(loader, probe, tmp_path):
    model = TinyNet()
    model.unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'unused' to output 2 samples along dim 0.*but got 0"):
        fit(model, loader, RSMMonitor(probe, ["unused"]), tmp_path)


class TwiceNet(TinyNet):
    def forward(self, x: Tensor) -> Tensor:
        self.pool(self.conv(x))
        return super().forward(x)


def test_layer_that_runs_twice_fails_at_fit_start(loader, probe, tmp_path):
    with pytest.raises(ValueError, match="'pool' to output 2 samples along dim 0.*but got 4"):
        fit(TwiceNet(), loader, RSMMonitor(probe, ["pool"]), tmp_path)


def test_mid_epoch_validation_does_not_add_evaluations(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"])
    trainer = fit(
        TinyNetWithVal(), loader, monitor, tmp_path, val=loader, max_epochs=2, val_check_interval=1
    )
    assert trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.completed > 2 * 3
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(0, 3), (1, 6)]


# ------------------------------------------------------------------ schedule


def test_without_validation_evaluates_after_every_nth_training_epoch(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    fit(TinyNet(), loader, monitor, tmp_path, max_epochs=5)
    assert [row["epoch"] for row in monitor.history] == [1, 3]
    assert [row["step"] for row in monitor.history] == [6, 12]  # 3 batches per epoch


def test_epochs_without_validation_are_evaluated_after_training(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"])
    trainer = fit(
        TinyNetWithVal(),
        loader,
        monitor,
        tmp_path,
        val=loader,
        max_epochs=3,
        check_val_every_n_epoch=2,
    )
    assert [row["epoch"] for row in monitor.history] == [0, 1, 2]
    assert trainer.callback_metrics["rsm/conv/semantic/map"] == pytest.approx(
        monitor.history[-1]["rsm/conv/semantic/map"]
    )


class CountsSanityBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        self.batches += trainer.sanity_checking


def test_neither_the_sanity_check_nor_validate_evaluates(loader, probe, tmp_path):
    monitor, counter = RSMMonitor(probe, ["conv"]), CountsSanityBatches()
    fit(
        TinyNetWithVal(),
        loader,
        monitor,
        tmp_path,
        val=loader,
        callbacks=[counter],
        max_epochs=1,
        num_sanity_val_steps=2,
    )
    assert counter.batches == 2  # the sanity check ran
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(0, 3)]
    trainer = pl.Trainer(callbacks=[monitor], **trainer_kwargs(tmp_path))
    trainer.validate(TinyNetWithVal(), loader, verbose=False)
    assert len(monitor.history) == 1


# ------------------------------------------------------------------ probes, labels, logits


@pytest.mark.oldest
def test_tuple_dataset_and_dataloader_probes_give_the_same_scores(loader, probe, tmp_path):
    x, y = probe
    probes = [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)]
    histories = []
    for p in probes:
        pl.seed_everything(0)
        monitor = RSMMonitor(p, ["conv", "pool"], batch_size=4)
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=1)
        histories.append(untimed(monitor.history))
    assert histories[0] == histories[1] == histories[2]
    assert "rsm/pool/semantic/map" in histories[0][0]


def test_probe_without_labels_warns_once_and_skips_retrieval(loader, probe, tmp_path):
    monitor = RSMMonitor((probe[0],), ["conv"])
    with pytest.warns(UserWarning, match="no labels") as record:
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=2)
    assert sum("no labels" in str(w.message) for w in record) == 1
    keys = set(monitor.history[-1])
    assert "rsm/conv/semantic/probability_agreement" in keys
    assert not any(k.endswith(("/map", "/precision@1")) for k in keys)


class PairOut(nn.Module):
    """A layer with a tuple output, like nn.LSTM or nn.MultiheadAttention."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.mean()


class TupleNet(TinyNet):
    """Forward returns (features, logits): the default logits cannot be used."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = PairOut()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, _ = self.pair(self.pool(self.conv(x)))
        return h, self.head(h.flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)[1], y)


def test_output_without_logits_warns_and_skips_agreement(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["pair"])
    with pytest.warns(UserWarning, match="probability agreement is not computed"):
        fit(TupleNet(), loader, monitor, tmp_path, max_epochs=1)
    keys = set(monitor.history[-1])
    assert "rsm/pair/semantic/map" in keys
    assert not any(k.endswith("/probability_agreement") for k in keys)


@pytest.mark.oldest
def test_logits_fn_and_tuple_layer_outputs(loader, probe, tmp_path):
    pl.seed_everything(0)
    tuple_monitor = RSMMonitor(probe, ["pair"], logits_fn=lambda out: out[1])
    fit(TupleNet(), loader, tuple_monitor, tmp_path, max_epochs=1)
    # The same weights without the tuple layer: "pair" outputs exactly what "pool" does.
    pl.seed_everything(0)
    plain_monitor = RSMMonitor(probe, ["pool"])
    fit(TinyNet(), loader, plain_monitor, tmp_path, max_epochs=1)
    got = {k.replace("/pair/", "/x/"): v for k, v in untimed(tuple_monitor.history)[0].items()}
    want = {k.replace("/pool/", "/x/"): v for k, v in untimed(plain_monitor.history)[0].items()}
    assert got == want
    assert "rsm/x/semantic/probability_agreement" in got


def test_logits_fn_returning_no_logits_fails_at_fit_start(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["pair"], logits_fn=lambda out: out[0])
    with pytest.raises(ValueError, match="`logits_fn` to return logits of shape"):
        fit(TupleNet(), loader, monitor, tmp_path, max_epochs=1)


# ------------------------------------------------------------------ side effects and faults


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002


def test_untouched_restores_modes_and_every_rng():
    model = TinyNet()
    model.head.eval()  # a mixed state: the head frozen in eval mode
    modes = [m.training for m in model.modules()]
    seed_all(1)
    with untouched(model):
        model.train()
        assert not torch.is_grad_enabled()
        torch.rand(3), random.random(), np.random.rand()  # noqa: NPY002
    after = torch.rand(1), random.random(), np.random.rand()  # noqa: NPY002
    seed_all(1)
    assert after == (torch.rand(1), random.random(), np.random.rand())  # noqa: NPY002
    assert [m.training for m in model.modules()] == modes


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("with_val", [False, True])
def test_training_is_identical_with_and_without_the_callback(
    data, probe, tmp_path, with_val, background
):
    """Dropout, batch norm, a shuffled training set and a shuffled probe loader."""

    def train(monitor: RSMMonitor | None) -> dict[str, Tensor]:
        pl.seed_everything(0)
        model = TinyNetWithVal(dropout=0.5) if with_val else TinyNet(dropout=0.5)
        loader = DataLoader(TensorDataset(*data), batch_size=16, shuffle=True)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=3)
        )
        val = DataLoader(TensorDataset(*data), batch_size=16) if with_val else None
        trainer.fit(model, loader, val)
        return model.state_dict()

    probe_loader = DataLoader(TensorDataset(*probe), batch_size=5, shuffle=True)
    monitor = RSMMonitor(probe_loader, ["conv"], background=background)
    with_callback = train(monitor)
    without = train(None)
    assert len(monitor.history) == 3
    assert with_callback.keys() == without.keys()
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name


class PoisonedNet(TinyNet):
    """In eval mode during epoch 1 the features are NaN: that evaluation fails."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.current_epoch == 1:
            x = x * math.nan
        return super().forward(x)


@pytest.mark.oldest
def test_a_failing_evaluation_warns_and_training_goes_on(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"])
    with pytest.warns(UserWarning, match="evaluation at epoch 1 failed and was skipped"):
        trainer = fit(PoisonedNet(), loader, monitor, tmp_path, max_epochs=3)
    assert trainer.current_epoch == 3
    assert [row["epoch"] for row in monitor.history] == [0, 2]
    assert "rsm/conv/rsa_to_previous" in monitor.history[1]  # against epoch 0


# ------------------------------------------------------------------ checkpoints


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
def test_resume_repeats_and_loses_no_evaluation(data, probe, tmp_path, background):
    """With ``background``, the monitored key makes the first evaluation of a fit wait."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[RSMMonitor, ModelCheckpoint]:
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, ["conv", "pool"], background=background)
        checkpoint = ModelCheckpoint(
            tmp_path / f"ckpt_{max_epochs}_{ckpt_path is not None}",
            save_last=True,
            monitor="rsm/conv/semantic/map",
            mode="max",
        )
        trainer = pl.Trainer(
            callbacks=[monitor, checkpoint],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(TinyNetWithVal(), loader, loader, ckpt_path=ckpt_path)
        return monitor, checkpoint

    straight, _ = run(4)
    first, checkpoint = run(2)
    assert checkpoint.best_model_score == pytest.approx(
        max(row["rsm/conv/semantic/map"] for row in first.history)
    )
    resumed, _ = run(4, ckpt_path=checkpoint.last_model_path)
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3]
    expected, got = untimed(straight.history), untimed(resumed.history)
    assert got[:2] == untimed(first.history)
    for row_got, row_expected in zip(got, expected, strict=True):
        assert row_got.keys() == row_expected.keys()
        for key, value in row_expected.items():
            assert row_got[key] == pytest.approx(value, abs=1e-5), key
    # drift at the first resumed epoch compares with epoch 1's RSM, restored from the checkpoint
    assert "rsm/pool/rsa_to_previous" in got[2]


def test_state_dict_round_trip(probe):
    monitor = RSMMonitor(probe, ["conv"])
    monitor.history = [{"epoch": 0, "step": 3, "rsm/conv/semantic/map": 0.5}]
    monitor._last_epoch = 0
    monitor._rsms = {"conv": {"semantic": torch.eye(12), "baseline": torch.eye(12) / 2}}
    monitor._ranges = {"conv": (0.0, 1.0)}
    monitor._log_step = 2
    other = RSMMonitor(probe, ["conv"])
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history
    assert other._last_epoch == 0
    # the semantic RSMs (drift's reference) travel; the baseline is not needed for a resume
    assert other.rsms.keys() == {"conv"} and other.rsms["conv"].keys() == {"semantic"}
    assert torch.equal(other.rsms["conv"]["semantic"], torch.eye(12))
    assert other._ranges == {"conv": (0.0, 1.0)}
    assert other._log_step == 2
    assert other.state_key == "RSMMonitor{'layers': ('conv',), 'kernel': 'cosine'}"


@pytest.mark.oldest
def test_warnings_are_not_raised_for_a_clean_run(loader, probe, tmp_path):
    monitor = RSMMonitor(probe, ["conv"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=1)
    assert not [w for w in record if "RSMMonitor" in str(w.message) or "probe" in str(w.message)]


@pytest.mark.parametrize(
    "options",
    [
        {"kernel": "rbf", "sigma": 2.0, "matcher": "windowed", "window": 2},
        {"kernel": "cosine", "matcher": "auction", "tol": 1e-2},
    ],
)
def test_rsm_options_reach_the_rsm(probe, loader, tmp_path, options):
    probe_x, probe_y = probe
    monitor = RSMMonitor(probe, ["conv"], max_positions=None, **options)
    model = TinyNet()
    fit(model, loader, monitor, tmp_path, max_epochs=1)
    model.eval()
    with torch.no_grad():
        x = model.conv(probe_x)
    sem = semantic_rsm(x, **options)
    base = spatio_semantic_rsm(x, kernel=options["kernel"], sigma=options.get("sigma"))
    last = monitor.history[-1]
    for kind, rsm in (("semantic", sem), ("baseline", base)):
        expected = float(retrieval_average_precision(rsm, probe_y))
        assert last[f"rsm/conv/{kind}/map"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("bar", [True, False])
def test_progress_of_pairs_per_layer_follows_the_trainer_progress_bar(
    loader, probe, tmp_path, capfd, bar
):
    fit(
        TinyNet(),
        loader,
        RSMMonitor(probe, ["conv"]),
        tmp_path,
        max_epochs=1,
        enable_progress_bar=bar,
    )
    err = capfd.readouterr().err
    assert ("RSMMonitor conv" in err) == bar
    if bar:
        assert "/66 " in err  # 12 probe samples: 66 pairs i < j


def test_warm_started_evaluations_equal_cold_ones(loader, probe, tmp_path):
    """Each layer keeps its pairs' exact solutions between evaluations: the same RSMs."""
    warm = RSMMonitor(probe, ["conv", "pool"], max_positions=16)
    cold = RSMMonitor(probe, ["conv", "pool"], max_positions=16, warm_start_bytes=0)
    for monitor in (warm, cold):
        pl.seed_everything(0)
        fit(TinyNet(), loader, monitor, tmp_path, max_epochs=3)
    assert sorted(warm._caches) == ["conv", "pool"] and cold._caches == {}
    assert warm._caches["conv"].stats["warm_pairs"] == 66  # every pair of 12 probe samples
    for row_warm, row_cold in zip(untimed(warm.history), untimed(cold.history), strict=True):
        for key, value in row_cold.items():
            assert row_warm[key] == pytest.approx(value, abs=1e-6), key
    with pytest.raises(MisconfigurationException, match="`warm_start_bytes` to be a non-neg"):
        RSMMonitor(probe, ["conv"], warm_start_bytes=-1)
    assert RSMMonitor(probe, ["conv"], matcher="greedy")._caches == {}
