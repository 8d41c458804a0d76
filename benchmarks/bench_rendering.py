"""Time drawing and rendering each picture against the semantic RSM it shows, at the same N.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_rendering.py [--n 120 500] [--repeats 5]

For each N: one exact cosine semantic RSM of random ReLU features ``(N, 64, 7, 7)`` (S = 49,
one layer of a monitor's evaluation), then each figure of :mod:`lightning_rsm.plotting` drawn
and rendered to an RGB array (:func:`~lightning_rsm.plotting.figure_to_rgb`, what a logger
gets), the median of ``--repeats`` after one warm-up: the layer's heatmap pair, its
neighbours (8 queries, top 5, ``(N, 1, 32, 32)`` images), the 3-layer RSA matrix and the
history of 30 evaluations of 3 layers. Prints seconds and each figure's time as a fraction
of the RSM's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from matplotlib.figure import Figure

from lightning_rsm.functional import semantic_rsm, spatio_semantic_rsm
from lightning_rsm.plotting import (
    figure_to_rgb,
    heatmap_figure,
    history_figure,
    neighbours_figure,
    rsa_figure,
)


def seconds(draw: Callable[[], Figure], repeats: int) -> float:
    """Median wall time of drawing a figure and rendering it to an RGB array (after a warm-up
    draw, which loads fonts and caches layouts once per process)."""
    figure_to_rgb(draw())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        figure_to_rgb(draw())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def history(evaluations: int, layers: list[str]) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    entries = []
    for e in range(evaluations):
        entry = {"epoch": e, "step": 50 * e, "rsm/time_s": 10.0 + float(torch.rand(1, generator=g))}
        for layer in layers:
            for kind in ("semantic", "baseline"):
                for score in ("map", "precision@1", "recall@1", "probability_agreement"):
                    entry[f"rsm/{layer}/{kind}/{score}"] = float(torch.rand(1, generator=g))
            if e:
                entry[f"rsm/{layer}/rsa_to_previous"] = float(torch.rand(1, generator=g))
        entries.append(entry)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[120, 500], help="probe sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = ["N", "semantic RSM s", "heatmap pair", "neighbours", "layer RSA", "history (30)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    layers = ["block1", "block2", "block3"]
    for n in args.n:
        g = torch.Generator().manual_seed(n)
        features = torch.randn(n, 64, 7, 7, generator=g).relu()
        labels = torch.arange(n) % 10
        start = time.perf_counter()
        semantic = semantic_rsm(features)
        t_rsm = time.perf_counter() - start
        rsms = {"semantic": semantic, "baseline": spatio_semantic_rsm(features)}
        images = torch.rand(n, 1, 32, 32, generator=g)
        rsa = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.7], [0.3, 0.7, 1.0]])
        evaluations = history(30, layers)
        when = {"epoch": 3, "step": 150}
        figures = [
            partial(heatmap_figure, rsms, labels, layer="block3", **when),
            partial(neighbours_figure, rsms, images, labels, layer="block3", **when),
            partial(rsa_figure, rsa, layers, **when),
            partial(history_figure, evaluations),
        ]
        cells = [
            f"{s:.2f} s ({s / t_rsm:.1%})" for s in (seconds(f, args.repeats) for f in figures)
        ]
        print(f"| {n} | {t_rsm:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
