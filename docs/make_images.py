"""Draw the README's example pictures (docs/images/*.png) from the demo's CNN.

Trains the demo CNN on shifted digits for three epochs with a plain loop, evaluating the RSMs
of its three blocks on 120 probe images before training and after each epoch, then draws each
kind of picture of :mod:`lightning_rsm.plotting` once. Run from the repository root:
``python docs/make_images.py`` (about a minute on 2 cores).
"""

import io
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lightning_rsm.demo import DEMO_LAYERS, DigitsCNN, shifted_digits, split_probe
from lightning_rsm.functional import (
    compare_rsms,
    rsa_matrix,
    rsm_scores,
    semantic_rsm,
    spatio_semantic_rsm,
    to_concepts,
)
from lightning_rsm.plotting import (
    as_images,
    figure_to_png,
    heatmap_figure,
    history_figure,
    neighbours_figure,
    query_indices,
    rsa_figure,
)


def evaluate(model, probe, labels, epoch, step, previous):
    """The RSMs of each block and one history entry of the monitor's keys."""
    features = {}
    hooks = [
        getattr(model, layer).register_forward_hook(
            lambda module, args, out, layer=layer: features.__setitem__(layer, out)
        )
        for layer in DEMO_LAYERS
    ]
    model.eval()
    with torch.no_grad():
        logits = model(probe)
    for hook in hooks:
        hook.remove()
    start, entry, rsms = time.perf_counter(), {"epoch": epoch, "step": step}, {}
    for layer in DEMO_LAYERS:
        concepts = to_concepts(features[layer], max_positions=64)
        rsms[layer] = {
            "semantic": semantic_rsm(concepts),
            "baseline": spatio_semantic_rsm(concepts),
        }
        for kind, rsm in rsms[layer].items():
            for score, value in rsm_scores(rsm, labels, logits).items():
                entry[f"rsm/{layer}/{kind}/{score}"] = float(value)
        if layer in previous:
            entry[f"rsm/{layer}/rsa_to_previous"] = float(
                compare_rsms(rsms[layer]["semantic"], previous[layer]["semantic"])
            )
    entry["rsm/time_s"] = time.perf_counter() - start
    return rsms, entry


def save(figure, path: Path, dpi: int) -> None:
    """A PNG at ``dpi`` with an adaptive 128-colour palette, to keep the README light."""
    figure.set_dpi(dpi)
    image = Image.open(io.BytesIO(figure_to_png(figure))).convert("RGB")
    image.quantize(colors=128).save(path, optimize=True)
    print(f"{path}: {image.size[0]} x {image.size[1]}, {path.stat().st_size // 1024} KB")


def main() -> None:
    torch.manual_seed(0)
    images, labels = shifted_digits()
    probe_idx, train_idx = split_probe(labels, 12)
    probe, probe_labels = images[probe_idx], labels[probe_idx]
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rsms, entry = evaluate(model, probe, probe_labels, 0, 0, {})
    history, step = [entry], 0
    for epoch in range(1, 4):
        model.train()
        order = train_idx[torch.randperm(len(train_idx))]
        for batch in order.split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        rsms, entry = evaluate(model, probe, probe_labels, epoch, step, rsms)
        history.append(entry)
    out = Path("docs/images")
    when = {"epoch": 3, "step": step}
    block3 = rsms["block3"]
    save(
        heatmap_figure(block3, probe_labels, layer="block3", kernel="cosine", **when),
        out / "heatmaps.png",
        80,
    )
    layer_rsa = rsa_matrix([rsms[layer]["semantic"] for layer in DEMO_LAYERS])
    save(rsa_figure(layer_rsa, DEMO_LAYERS, method="spearman", **when), out / "layer_rsa.png", 80)
    queries = query_indices(probe_labels, len(probe), max_queries=4)
    neighbours = neighbours_figure(
        block3, as_images(probe), probe_labels, queries=queries, k=4, layer="block3", **when
    )
    save(neighbours, out / "neighbours.png", 72)
    save(history_figure(history), out / "history.png", 72)


if __name__ == "__main__":
    main()
