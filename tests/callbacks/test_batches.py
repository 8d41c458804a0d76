"""RSMMonitor with any batch structure: dict batches and keyword forwards (HuggingFace style),
and batches the pickers do not fit, which fail at fit start naming the structure and option."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch.nn.functional as F
from conftest import TinyNet
from helpers.fit import fit, untimed
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_rsm import RSMMonitor


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
    assert untimed(dict_monitor.history) == untimed(tuple_monitor.history)
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
