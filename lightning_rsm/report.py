"""The monitor's pictures and scores, redrawn offline from an RSM archive into one folder.

:func:`write_report` reads an archive (:mod:`lightning_rsm.archive`) one evaluation at a time
and writes:

==================================  ===========================================================
file                                content
==================================  ===========================================================
``scores.csv``                      ``step, epoch, layer, kind, score, value``: every score of
                                    :func:`~lightning_rsm.functional.rsm_scores` for every
                                    archived RSM, and ``rsa_to_previous`` of each layer's
                                    semantic RSM with the previous *archived* evaluation's
``trajectories.png``                those scores against the step, a panel per score
``rsm__<layer>__<kind>__heatmap``   each RSM of the chosen evaluation (default: the last),
``_step<step>.png``                 samples sorted by label, as the monitor logs it
``rsm__layer_rsa_step<step>.png``   the layer x layer RSA of that evaluation's semantic RSMs
==================================  ===========================================================

The scores are computed with the same function, labels and logits as the monitor, so they equal
the logged ones (the archive keeps the float32 RSMs the monitor scored).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from lightning_rsm.archive import archive_folder, archive_steps, load_evaluation
from lightning_rsm.functional import compare_rsms, rsa_matrix, rsm_scores
from lightning_rsm.image_logging import image_file_name
from lightning_rsm.plotting import default_colour_range, rsm_images

#: Columns of ``scores.csv``.
SCORE_COLUMNS = ("step", "epoch", "layer", "kind", "score", "value")


def _score_rows(folder: Path, steps: Sequence[int], method: str) -> list[tuple]:
    """One row per score of every archived RSM, evaluation by evaluation."""
    rows: list[tuple] = []
    previous = None
    for step in steps:
        evaluation = load_evaluation(folder, step)
        for layer, kinds in evaluation.rsms.items():
            for kind, rsm in kinds.items():
                scores = rsm_scores(rsm, evaluation.labels, evaluation.logits)
                rows += [(step, evaluation.epoch, layer, kind, key, float(v))
                         for key, v in scores.items()]  # fmt: skip
            before = previous.rsms.get(layer, {}) if previous is not None else {}
            if "semantic" in kinds and "semantic" in before:
                rsa = compare_rsms(kinds["semantic"], before["semantic"], method=method)
                rows.append(
                    (step, evaluation.epoch, layer, "semantic", "rsa_to_previous", float(rsa))
                )
        previous = evaluation
    return rows


def trajectory_figure(rows: Sequence[tuple]) -> Figure:
    """Scores against the step: a panel per score, a colour per layer, dashed for baselines.

    Args:
        rows: ``(step, epoch, layer, kind, score, value)`` tuples, as in ``scores.csv``.

    Example:
        >>> rows = [(10, 0, "fc", "semantic", "map", 0.5), (20, 1, "fc", "semantic", "map", 0.7)]
        >>> trajectory_figure(rows).axes[0].get_title()
        'map'
    """
    scores = list(dict.fromkeys(row[4] for row in rows))
    layers = list(dict.fromkeys(row[2] for row in rows))
    cols = min(3, len(scores))
    grid = math.ceil(len(scores) / cols)
    fig = Figure(figsize=(3.8 * cols + 1.6, 3.0 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False).flatten()
    for ax, score in zip(axes, scores, strict=False):
        for index, layer in enumerate(layers):
            for kind, style in (("semantic", "-"), ("baseline", "--")):
                points = [(r[0], r[5]) for r in rows if r[2:5] == (layer, kind, score)]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, marker=".", color=f"C{index}",
                            label=f"{layer} {kind}")  # fmt: skip
        ax.set_title(score)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(scores) :]:
        ax.set_axis_off()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle("RSM scores per evaluation (solid: semantic, dashed: baseline)")
    return fig


def write_report(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    evaluation: int = -1,
    step: int | None = None,
) -> list[Path]:
    """Draw an archive's score trajectories, heatmaps and layer x layer RSA into ``out``.

    Args:
        run: a run's log dir or its ``rsms`` folder.
        out: the folder to write to (created if missing).
        evaluation: the evaluation whose heatmaps are drawn, an index in step order.
        step: instead of ``evaluation``, its step.

    Returns:
        the files written (see the module docstring).

    Raises:
        ValueError: If the folder holds no archive, or ``evaluation``/``step`` selects nothing.
    """
    folder = archive_folder(run)
    steps = archive_steps(folder)
    if step is None:
        if not -len(steps) <= evaluation < len(steps):
            raise ValueError(
                f"Expected `evaluation` to index the {len(steps)} archived evaluations, "
                f"but got {evaluation}."
            )
        step = steps[evaluation]
    chosen = load_evaluation(folder, step)  # raises for a step that is not archived
    method = str(chosen.settings.get("method", "spearman"))
    kernel = str(chosen.settings.get("kernel", "cosine"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    rows = _score_rows(folder, steps, method)
    scores_csv = out / "scores.csv"
    with scores_csv.open("w", newline="") as file:
        csv.writer(file).writerows([SCORE_COLUMNS, *rows])
    written.append(scores_csv)
    if rows:
        trajectory_figure(rows).savefig(out / "trajectories.png", dpi=100)
        written.append(out / "trajectories.png")

    ranges = {
        layer: default_colour_range(kernel, list(kinds.values()))
        for layer, kinds in chosen.rsms.items()
    }
    semantic = [kinds["semantic"] for kinds in chosen.rsms.values() if "semantic" in kinds]
    layer_rsa = rsa_matrix(semantic, method=method) if len(semantic) > 1 else None
    for tag, image in rsm_images(chosen.rsms, chosen.labels, ranges, layer_rsa).items():
        path = out / image_file_name(tag, chosen.step)
        Image.fromarray(image).save(path)
        written.append(path)
    return written
