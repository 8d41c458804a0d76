"""The Metrics inside a LightningModule, as the README shows: update in ``validation_step``,
log at the epoch's end; in one process and under 2-process DDP, where Lightning's
DistributedSampler repeats samples to even out the ranks and ``ids`` drop the repeats."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, make_data, trainer_kwargs
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_rsm.functional import probability_agreement, rsm_scores, semantic_rsm
from lightning_rsm.metrics import ProbabilityAgreement, SemanticRSM

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

N_VAL = 241  # odd: on 2 ranks the sampler pads it to 242


class Indexed(Dataset):
    """(image, label, index): the index is the sample's id."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.images[i], self.labels[i], i


class WithRSMMetrics(TinyNet):
    """Logs SemanticRSM's scores with log_dict and ProbabilityAgreement as a Metric object;
    each rank saves what it computed to ``folder/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.rsm_metric = SemanticRSM()
        self.agreement = ProbabilityAgreement()

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, ids = batch
        features = self.pool(self.conv(x))
        logits = self.head(features.flatten(1))
        self.rsm_metric.update(features, labels=y, logits=logits, ids=ids)
        self.agreement.update(features, logits)
        self.log("val/agreement", self.agreement, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        scores = self.rsm_metric.compute()
        self.log_dict({f"val/rsm/{name}": value for name, value in scores.items()}, sync_dist=True)
        torch.save(
            {"rsm": self.rsm_metric.rsm(), "scores": scores},
            f"{self.folder}/rank{self.global_rank}.pt",
        )
        self.rsm_metric.reset()


def _expected(model: TinyNet, images: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
    model.eval()
    with torch.no_grad():
        features = model.pool(model.conv(images))
        logits = model.head(features.flatten(1))
    rsm = semantic_rsm(features)
    return rsm, {**rsm_scores(rsm, labels, logits), "agreement": probability_agreement(rsm, logits)}


@pytest.mark.parametrize("devices", [1, 2])
def test_metrics_log_from_a_lightning_module_one_row_per_sample(tmp_path, devices):
    pl.seed_everything(0)
    images, labels = make_data(N_VAL, seed=3)
    model = WithRSMMetrics(str(tmp_path))
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            num_sanity_val_steps=0,
            devices=devices,
            strategy="ddp_spawn" if devices == 2 else "auto",
        )
    )
    trainer.fit(
        model,
        DataLoader(TensorDataset(*make_data()), batch_size=16),
        DataLoader(Indexed(images, labels), batch_size=64),
    )
    # ddp_spawn hands rank 0's final weights and callback metrics back to this process
    rsm, expected = _expected(model, images, labels)
    for rank in range(devices):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["rsm"].shape == (N_VAL, N_VAL)  # the sampler's repeat is dropped
        torch.testing.assert_close(saved["rsm"], rsm, atol=1e-5, rtol=1e-4)
    for name in ("map", "precision@1", "recall@1", "probability_agreement"):
        logged = trainer.callback_metrics[f"val/rsm/{name}"]
        assert float(logged) == pytest.approx(float(expected[name]), abs=1e-5)
    assert "val/agreement" in trainer.callback_metrics
    if devices == 1:  # under DDP this Metric (no ids) also scores the repeated sample
        logged = float(trainer.callback_metrics["val/agreement"])
        assert logged == pytest.approx(float(expected["agreement"]), abs=1e-5)
