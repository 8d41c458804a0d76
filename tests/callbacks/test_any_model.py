"""RSMMonitor around the plain CNN fed (inputs, labels) at epoch ends: dict batches, keyword
forwards, compiled models, token layers, step schedules, callbacks that read the scores, and
probes taken from the fit's validation data (issue 10)."""

from __future__ import annotations

import csv
import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyNet, TinyNetWithVal, make_data, trainer_kwargs
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.probe_selection import select_probe
from lightning_rsm.functional import (
    probability_agreement,
    retrieval_average_precision,
    semantic_rsm,
)


def fit(model, loader, monitor, tmp_path, val=None, callbacks=(), **overrides) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=[monitor, *callbacks], **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, loader, val)
    return trainer


def scores(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "rsm/time_s"} for row in history]


# ------------------------------------------------------------------ dict batches, keyword forward


class DictDataset(Dataset):
    """A HuggingFace-style dataset: each sample a dict."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


class KeywordNet(TinyNet):
    """Forward takes keywords only and returns a dict, like a HuggingFace model."""

    def forward(self, *, pixel_values: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"logits": super().forward(pixel_values)}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(pixel_values=batch["pixel_values"])["logits"], batch["labels"])


@pytest.mark.oldest
@pytest.mark.parametrize(
    "options",
    [
        {"input_fn": lambda batch: {"pixel_values": batch["pixel_values"]}, "label_fn": "labels"},
        {
            "input_fn": "pixel_values",
            "label_fn": lambda batch: batch["labels"],
            "forward_fn": lambda model, x: model(pixel_values=x),
        },
    ],
)
def test_dict_batches_and_keyword_forward_give_the_tuple_scores(data, probe, tmp_path, options):
    pl.seed_everything(0)
    dict_monitor = RSMMonitor(
        DataLoader(DictDataset(*probe), batch_size=5),
        ["conv", "pool"],
        logits_fn=lambda output: output["logits"],
        **options,
    )
    fit(KeywordNet(), DataLoader(DictDataset(*data), batch_size=16), dict_monitor, tmp_path)
    pl.seed_everything(0)
    tuple_monitor = RSMMonitor(probe, ["conv", "pool"])
    fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16), tuple_monitor, tmp_path)
    assert scores(dict_monitor.history) == scores(tuple_monitor.history)
    assert "rsm/pool/semantic/probability_agreement" in dict_monitor.history[0]


@pytest.mark.parametrize(
    ("batches", "options", "match"),
    [
        ("dict", {}, r"but got a dict with keys \['pixel_values', 'labels'\]; pass `input_fn`"),
        ("triple", {}, r"but got a list of length 3 \(Tensor, Tensor, Tensor\); pass `input_fn`"),
        ("dict", {"input_fn": "image"}, r"`input_fn='image'` to be a key or an index"),
        ("dict", {"input_fn": "pixel_values", "label_fn": 1}, r"`label_fn=1` to be a key"),
    ],
)
def test_a_bad_batch_fails_at_fit_start_naming_structure_and_option(
    data, probe, tmp_path, batches, options, match
):
    x, y = probe
    dataset = DictDataset(x, y) if batches == "dict" else TensorDataset(x, y, y)
    monitor = RSMMonitor(DataLoader(dataset, batch_size=4), ["conv"], **options)
    with pytest.raises(TypeError, match=match) as error:
        fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16), monitor, tmp_path)
    assert "\n" not in str(error.value)
    assert monitor.history == []


def test_a_keyword_model_called_positionally_fails_at_fit_start_naming_forward_fn(
    data, probe, tmp_path
):
    monitor = RSMMonitor(probe, ["conv"], logits_fn=lambda output: output["logits"])
    with pytest.raises(RuntimeError, match=r"`model\(inputs\)`.*TypeError.*Pass `forward_fn="):
        fit(KeywordNet(), DataLoader(DictDataset(*data), batch_size=16), monitor, tmp_path)


# ------------------------------------------------------------------ torch.compile


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
        warnings.filterwarnings("ignore", ".*does not have many workers")  # Lightning < 2.3
        graphs_with, weights_with = train(monitor)
    graphs_without, weights_without = train(None)
    assert graphs_with == graphs_without == 1
    assert [row["epoch"] for row in monitor.history] == [0, 1]
    for name, value in weights_without.items():
        assert torch.equal(weights_with[name], value), name


# ------------------------------------------------------------------ token layers


class TinyViT(pl.LightningModule):
    """Patch embedding (1 x 1 patches of a 10 x 10 image) + CLS + one transformer layer."""

    def __init__(self, dim: int = 8, side: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, 1)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + side * side, dim))
        self.encoder = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)  # (N, 100, dim)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), patches], dim=1) + self.position
        return self.head(self.encoder(tokens)[:, 0])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def vit_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    images, labels = make_data(n, seed)
    return F.interpolate(images, size=(10, 10)), labels


def test_token_layers_keep_the_cls_token_out_of_pooled_patches(tmp_path):
    """101 tokens = CLS + 10 x 10 patches, max_positions=25: the patches pool as a grid."""
    loader = DataLoader(TensorDataset(*vit_data(24, 0)), batch_size=12)
    probe = vit_data(9, 1)
    runs = {}
    for tokens in ("all", "patches", "special"):
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, ["encoder"], max_positions=25, special_tokens=1, tokens=tokens)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fit(TinyViT(), loader, monitor, tmp_path)
        runs[tokens] = monitor.history[-1], monitor._previous["encoder"]
        pooled = [str(w.message) for w in record if "'encoder' has 101 tokens" in str(w.message)]
        if tokens == "special":
            assert pooled == []
        else:
            assert len(pooled) == 1  # once, not per batch or per evaluation
            assert "patches are average-pooled as a 10 x 10 grid to 5 x 5" in pooled[0]
    # one concept vector (the CLS token): the semantic RSM is the baseline
    special = runs["special"][0]
    assert special["rsm/encoder/semantic/map"] == special["rsm/encoder/baseline/map"]
    assert not torch.allclose(runs["all"][1], runs["patches"][1])  # the CLS counts in "all"


def test_pooled_tokens_without_special_tokens_warn_with_a_hint(tmp_path):
    loader = DataLoader(TensorDataset(*vit_data(24, 0)), batch_size=12)
    monitor = RSMMonitor(vit_data(9, 1), ["encoder"], max_positions=25)
    with pytest.warns(UserWarning, match=r"101 = 1 \+ 10 x 10: .* `special_tokens=1`"):
        fit(TinyViT(), loader, monitor, tmp_path, max_epochs=1)


# ------------------------------------------------------------------ step schedule


def test_step_schedule_evaluates_mid_epoch_and_logs_at_that_step(data, probe, tmp_path):
    """3 batches per epoch, an evaluation every 2 steps: steps 2 (epoch 0), 4 and 6 (epoch 1)."""
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2)
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", monitor="rsm/conv/semantic/map", mode="max", every_n_train_steps=2
    )
    logger = CSVLogger(tmp_path, name="", version="")
    fit(
        TinyNetWithVal(),
        DataLoader(TensorDataset(*data), batch_size=16),
        monitor,
        tmp_path,
        val=DataLoader(TensorDataset(*data), batch_size=16),
        callbacks=[checkpoint],
        logger=logger,
        enable_checkpointing=True,
        log_every_n_steps=50,  # Lightning would send step values to loggers only every 50 steps
    )
    assert [(row["epoch"], row["step"]) for row in monitor.history] == [(0, 2), (1, 4), (1, 6)]
    assert checkpoint.best_model_score == pytest.approx(
        max(row["rsm/conv/semantic/map"] for row in monitor.history)
    )
    with open(tmp_path / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row.get("rsm/conv/semantic/map")]
    assert [int(row["step"]) for row in logged] == [2, 4, 6]
    assert [float(row["rsm/conv/semantic/map"]) for row in logged] == pytest.approx(
        [row["rsm/conv/semantic/map"] for row in monitor.history]
    )


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_leaves_training_identical(data, probe, tmp_path, background):
    def train(monitor: RSMMonitor | None) -> dict[str, Tensor]:
        pl.seed_everything(0)
        model = TinyNet(dropout=0.5)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=16, shuffle=True))
        return model.state_dict()

    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=1, background=background)
    with_callback, without = train(monitor), train(None)
    assert len(monitor.history) == 6
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name


@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_resume_repeats_and_loses_no_evaluation(data, probe, tmp_path, background):
    """The checkpoint of step 6 (saved after the evaluation of step 6) resumes to step 12. In
    the background no checkpoint may monitor a score of a step schedule, and the evaluation of
    step 6 may still run at the checkpoint: it is re-captured at resume."""
    loader = DataLoader(TensorDataset(*data), batch_size=16)

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[RSMMonitor, ModelCheckpoint]:
        pl.seed_everything(0)
        monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=2, background=background)
        checkpoint = ModelCheckpoint(
            tmp_path / f"ckpt_{max_epochs}_{ckpt_path is not None}",
            monitor=None if background else "rsm/conv/semantic/map",
            mode="max",
            every_n_train_steps=2,
            save_last=True,
        )
        trainer = pl.Trainer(
            callbacks=[monitor, checkpoint],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(TinyNet(), loader, ckpt_path=ckpt_path)
        return monitor, checkpoint

    straight, _ = run(4)
    first, checkpoint = run(2)
    resumed, _ = run(4, ckpt_path=checkpoint.last_model_path)
    assert [row["step"] for row in resumed.history] == [2, 4, 6, 8, 10, 12]
    expected, got = scores(straight.history), scores(resumed.history)
    for row_got, row_expected in zip(got, expected, strict=True):
        assert row_got.keys() == row_expected.keys()
        for key, value in row_expected.items():
            assert row_got[key] == pytest.approx(value, abs=1e-5), key


# ------------------------------------------------------------------ callbacks that read scores

KEY = "rsm/conv/semantic/map"


@pytest.mark.parametrize(
    ("monitor_options", "reader", "val_check_interval", "match"),
    [
        (
            {"every_n_epochs": 2},
            lambda: ModelCheckpoint(monitor=KEY, mode="max"),
            1.0,
            r"reads every 1 epoch\(s\) .* pass `ModelCheckpoint\(every_n_epochs=2\)`",
        ),
        (
            {"every_n_epochs": 2},
            lambda: EarlyStopping(KEY, mode="max"),
            1.0,
            r"`EarlyStopping\(monitor=.*`RSMMonitor\(every_n_epochs=1\)`",
        ),
        (
            {"every_n_train_steps": 2},
            lambda: EarlyStopping(KEY, mode="max"),
            None,
            r"reads at epoch ends .* pass `RSMMonitor\(every_n_epochs=1\)`",
        ),
        (
            {"every_n_train_steps": 2},
            lambda: ModelCheckpoint(monitor=KEY, mode="max", every_n_train_steps=3),
            None,
            r"reads every 3 steps .* pass `ModelCheckpoint\(every_n_train_steps=2\)`",
        ),
        (
            {},
            lambda: ModelCheckpoint(monitor=KEY, mode="max", every_n_train_steps=3),
            None,
            r"pass `RSMMonitor\(every_n_train_steps=3\)`",
        ),
        (
            {},
            lambda: EarlyStopping(KEY, mode="max"),
            0.5,
            r"after validation runs that do not end an epoch .*check_on_train_epoch_end=True",
        ),
    ],
)
def test_a_reader_at_another_interval_fails_before_training(
    data, probe, tmp_path, monitor_options, reader, val_check_interval, match
):
    """``val_check_interval`` None: no validation."""
    monitor = RSMMonitor(probe, ["conv"], **monitor_options)
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    with_val = val_check_interval is not None
    with pytest.raises(MisconfigurationException, match=match) as error:
        fit(
            TinyNetWithVal() if with_val else TinyNet(),
            loader,
            monitor,
            tmp_path,
            val=loader if with_val else None,
            callbacks=[reader()],
            enable_checkpointing=True,
            val_check_interval=val_check_interval if with_val else 1.0,
        )
    assert "\n" not in str(error.value)
    assert monitor.history == []


def test_early_stopping_listed_before_the_monitor_fails_without_validation(data, probe, tmp_path):
    trainer = pl.Trainer(
        callbacks=[EarlyStopping(KEY, mode="max"), RSMMonitor(probe, ["conv"])],
        **trainer_kwargs(tmp_path),
    )
    with pytest.raises(MisconfigurationException, match="list `RSMMonitor` before"):
        trainer.fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16))


def test_readers_at_the_monitor_interval_work(data, probe, tmp_path):
    loader = DataLoader(TensorDataset(*data), batch_size=16)
    monitor = RSMMonitor(probe, ["conv"], every_n_epochs=2)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", monitor=KEY, mode="max", every_n_epochs=2)
    stopping = EarlyStopping(KEY, mode="max", patience=5, check_on_train_epoch_end=False)
    fit(
        TinyNetWithVal(),
        loader,
        monitor,
        tmp_path,
        val=loader,
        callbacks=[checkpoint, stopping],
        enable_checkpointing=True,
        max_epochs=4,
        check_val_every_n_epoch=2,
    )
    assert [row["epoch"] for row in monitor.history] == [1, 3]
    assert checkpoint.best_model_score == pytest.approx(max(r[KEY] for r in monitor.history))


# ------------------------------------------------------------------ probe from validation data


def test_probe_from_validation_data_is_balanced_fixed_and_leaves_training_identical(data, tmp_path):
    x, y = data

    def train(monitor: RSMMonitor | None) -> dict[str, Tensor]:
        pl.seed_everything(0)
        model = TinyNetWithVal(dropout=0.5)
        trainer = pl.Trainer(
            callbacks=[monitor] if monitor else [], **trainer_kwargs(tmp_path, max_epochs=2)
        )
        val = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # shuffle is ignored
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), val)
        return model.state_dict()

    monitor = RSMMonitor(layers=["conv"], probe_size=12)
    with_callback, without = train(monitor), train(None)
    for name, value in without.items():
        assert torch.equal(with_callback[name], value), name
    assert torch.bincount(monitor._labels).tolist() == [4, 4, 4]
    expected_x, expected_y = select_probe(DataLoader(TensorDataset(x, y)), 12, 5)
    assert torch.equal(monitor._inputs, expected_x) and torch.equal(monitor._labels, expected_y)
    assert len(monitor.history) == 2


class ValData(pl.LightningDataModule):
    def __init__(self, data: tuple[Tensor, Tensor]) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.data), batch_size=16)


def test_probe_from_a_datamodule_is_the_same_after_a_resume(data, tmp_path):
    """TinyNet has no validation_step: the probe comes from the datamodule's val_dataloader."""

    def run(max_epochs: int, ckpt_path: str | None = None) -> tuple[RSMMonitor, pl.Trainer]:
        monitor = RSMMonitor(layers=["conv"], probe_size=9)
        trainer = pl.Trainer(
            callbacks=[monitor, ModelCheckpoint(tmp_path / "ckpt", save_last=True)],
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, enable_checkpointing=True),
        )
        trainer.fit(TinyNet(), datamodule=ValData(data), ckpt_path=ckpt_path)
        return monitor, trainer

    first, _ = run(1)
    resumed, _ = run(2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(first._inputs, resumed._inputs)
    assert torch.bincount(resumed._labels).tolist() == [3, 3, 3]
    assert [row["epoch"] for row in resumed.history] == [0, 1]


def test_no_probe_and_no_validation_data_fails_before_training(data, tmp_path):
    monitor = RSMMonitor(layers=["conv"])
    with pytest.raises(MisconfigurationException, match="Expected validation data for"):
        fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16), monitor, tmp_path)


# ------------------------------------------------------------------ constructor


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
def test_constructor_rejects_bad_new_options(probe, kwargs, error, match):
    with pytest.raises(error, match=match):
        RSMMonitor(probe, ["conv"], **kwargs)


@pytest.mark.oldest
@pytest.mark.parametrize("background", [False, True])
def test_step_schedule_under_ddp_logs_the_one_process_scores(data, probe, tmp_path, background):
    """2 gloo processes, 3 steps per epoch, evaluations at steps 3 and 6 (the last)."""
    pl.seed_everything(0)
    model = TinyNet()
    monitor = RSMMonitor(probe, ["conv"], every_n_train_steps=3, background=background)
    trainer = pl.Trainer(
        callbacks=[monitor],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2),
    )
    trainer.fit(model, DataLoader(TensorDataset(*data), batch_size=8))
    model.eval()  # ddp_spawn hands rank 0's final weights and callback metrics back
    x, y = probe
    with torch.no_grad():
        features, logits = model.conv(x), model(x)
    rsm = semantic_rsm(features)
    expected = {
        "map": retrieval_average_precision(rsm, y),
        "probability_agreement": probability_agreement(rsm, logits),
    }
    for score, value in expected.items():
        logged = trainer.callback_metrics[f"rsm/conv/semantic/{score}"]
        assert float(logged) == pytest.approx(float(value), abs=1e-5)
    assert "rsm/conv/rsa_to_previous" in trainer.callback_metrics  # two evaluations
