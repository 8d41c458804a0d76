"""RSM archives of small "runs" for the archive, comparison and report tests."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_data
from torch import nn

from lightning_rsm.archive import ArchiveWriter, probe_fingerprint
from lightning_rsm.functional import semantic_rsm, spatio_semantic_rsm, to_concepts

LAYERS = ("conv1", "conv2", "pool")


def layer_features(images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Three layers of a small random conv net: (N, 4, 8, 8), (N, 6, 8, 8), (N, 6, 2, 2)."""
    torch.manual_seed(seed)
    conv1, conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        a = torch.relu(conv1(images))
        b = torch.relu(conv2(a))
        return {"conv1": a, "conv2": b, "pool": nn.functional.adaptive_avg_pool2d(b, 2)}


def evaluation_rsms(images: torch.Tensor, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Semantic and baseline RSMs of each layer, as the monitor computes them."""
    concepts = {
        layer: to_concepts(x, max_positions=16) for layer, x in layer_features(images, seed).items()
    }
    return {
        layer: {"semantic": semantic_rsm(x), "baseline": spatio_semantic_rsm(x)}
        for layer, x in concepts.items()
    }


def write_run(
    log_dir: Path,
    *,
    seed: int = 0,
    steps: tuple[int, ...] = (10, 20),
    n: int = 12,
    probe_seed: int = 3,
    ids: list[str] | None = None,
) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Write evaluations at ``steps`` under ``log_dir/rsms``; return the RSMs by step."""
    images, labels = make_data(n, seed=probe_seed)
    writer = ArchiveWriter(
        log_dir / "rsms",
        fingerprint=probe_fingerprint(images, labels),
        labels=labels,
        ids=ids,
        settings={
            "kernel": "cosine",
            "matcher": "exact",
            "max_positions": 16,
            "method": "spearman",
        },
    )
    written = {}
    for index, step in enumerate(steps):
        rsms = evaluation_rsms(images, seed + 100 * index)
        logits = torch.randn(n, 3, generator=torch.Generator().manual_seed(step))
        writer.write(step=step, epoch=index, rsms=rsms, logits=logits)
        written[step] = rsms
    return written
