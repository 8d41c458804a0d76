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
``trajectories.png``                those scores over the evaluations, a panel per score
                                    (:func:`~lightning_rsm.plotting.history_figure`)
``rsm__<layer>__heatmap``           each layer's RSMs of the chosen evaluation (default: the
``_step<step>.png``                 last), as the monitor logs them
                                    (:func:`~lightning_rsm.plotting.heatmap_figure`, on the
                                    evaluation's own colour scale)
``rsm__layer_rsa_step<step>.png``   the layer x layer RSA of that evaluation's semantic RSMs
                                    (:func:`~lightning_rsm.plotting.rsa_figure`; 2+ layers)
==================================  ===========================================================

The scores are computed with the same function, labels and logits as the monitor, so they equal
the logged ones (the archive keeps the float32 RSMs the monitor scored); the pictures are drawn
by the monitor's own code (:func:`~lightning_rsm.plotting.evaluation_figures`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_rsm.archive import archive_folder, archive_steps, load_evaluation
from lightning_rsm.functional import compare_rsms, rsa_matrix, rsm_scores
from lightning_rsm.image_logging import image_file_name
from lightning_rsm.plotting import evaluation_figures, figure_to_png, history_figure

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
                rows += [
                    (step, evaluation.epoch, layer, kind, key, float(v))
                    for key, v in scores.items()
                ]
            before = previous.rsms.get(layer, {}) if previous is not None else {}
            if "semantic" in kinds and "semantic" in before:
                rsa = compare_rsms(kinds["semantic"], before["semantic"], method=method)
                rows.append(
                    (step, evaluation.epoch, layer, "semantic", "rsa_to_previous", float(rsa))
                )
        previous = evaluation
    return rows


def as_history(rows: Sequence[tuple]) -> list[dict[str, float]]:
    """``scores.csv`` rows as the monitor's ``history``: one dict per evaluation (in step order)
    with ``epoch``, ``step`` and keys ``rsm/<layer>/<kind>/<score>`` (``rsm/<layer>/<score>``
    for ``rsa_to_previous``), as :func:`~lightning_rsm.plotting.history_figure` reads them.

    Example:
        >>> rows = [(10, 0, "fc", "semantic", "map", 0.5), (20, 1, "fc", "semantic", "map", 0.7),
        ...         (20, 1, "fc", "semantic", "rsa_to_previous", 0.9)]
        >>> as_history(rows)[1]
        {'epoch': 1, 'step': 20, 'rsm/fc/semantic/map': 0.7, 'rsm/fc/rsa_to_previous': 0.9}
    """
    history: dict[int, dict[str, float]] = {}
    for step, epoch, layer, kind, score, value in rows:
        key = (
            f"rsm/{layer}/{score}" if score == "rsa_to_previous" else f"rsm/{layer}/{kind}/{score}"
        )
        history.setdefault(step, {"epoch": epoch, "step": step})[key] = value
    return [history[step] for step in sorted(history)]


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
        (out / "trajectories.png").write_bytes(figure_to_png(history_figure(as_history(rows))))
        written.append(out / "trajectories.png")

    semantic = [kinds["semantic"] for kinds in chosen.rsms.values() if "semantic" in kinds]
    layer_rsa = rsa_matrix(semantic, method=method) if len(semantic) > 1 else None
    figures, _ = evaluation_figures(
        chosen.rsms,
        chosen.labels,
        epoch=chosen.epoch,
        step=chosen.step,
        kernel=kernel,
        layer_rsa=layer_rsa,
        method=method,
    )
    for tag, figure in figures.items():
        path = out / image_file_name(tag, chosen.step)
        path.write_bytes(figure_to_png(figure))
        written.append(path)
    return written
