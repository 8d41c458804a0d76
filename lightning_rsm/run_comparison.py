"""Two systems compared layer by layer: the RSA of every layer of one run with every layer of
another, on the same probe, from their RSM archives (:mod:`lightning_rsm.archive`).

Each cell is :func:`~lightning_rsm.functional.compare_rsms` of one layer's RSM in run A and one
layer's RSM in run B, the table model-vs-model CKA studies show. Both archives must hold RSMs of
the same probe samples in the same order (:func:`check_same_probe`); anything else is an error,
never a silent misalignment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_rsm.archive import ArchivedEvaluation, archive_steps, load_evaluation
from lightning_rsm.functional import compare_rsms
from lightning_rsm.functional.options import COMPARISON_METHODS, check_choice

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Run = str | os.PathLike | ArchivedEvaluation


class ProbeMismatchError(ValueError):
    """Two RSM archives were not made on the same probe samples in the same order."""


@dataclass(frozen=True)
class RunComparison:
    """The layer x layer similarity of two runs' RSMs.

    Attributes:
        matrix: float32 ``(L_a, L_b)``; ``matrix[i, j]`` compares layer ``layers_a[i]`` of run A
            with layer ``layers_b[j]`` of run B.
        layers_a: run A's layer names (rows).
        layers_b: run B's layer names (columns).
        method: the RSA method (see :func:`~lightning_rsm.functional.compare_rsms`).
        kind: the RSMs compared, ``"semantic"`` or ``"baseline"``.
        step_a: the step of run A's evaluation; ``step_b`` likewise.
    """

    matrix: Tensor
    layers_a: list[str]
    layers_b: list[str]
    method: str
    kind: str
    step_a: int
    step_b: int

    def table(self, name_a: str = "A", name_b: str = "B") -> str:
        """The matrix as text: run A's layers down, run B's across, three decimals.

        Example:
            >>> result = RunComparison(torch.tensor([[1.0, 0.25]]), ["fc"], ["conv", "fc"],
            ...                        "spearman", "semantic", 10, 10)
            >>> print(result.table("a", "b"))
            spearman of semantic RSMs, a (rows, step 10) vs b (columns, step 10)
            a \\ b    conv      fc
            fc      1.000   0.250
        """
        corner = f"{name_a} \\ {name_b}"
        first = max(len(corner), *(len(layer) for layer in self.layers_a))
        widths = [max(6, len(layer)) for layer in self.layers_b]
        header = "  ".join(
            [
                corner.ljust(first),
                *(f"{name:>{w}}" for name, w in zip(self.layers_b, widths, strict=True)),
            ]
        )
        rows = [
            "  ".join(
                [layer.ljust(first)]
                + [f"{float(v):>{w}.3f}" for v, w in zip(values, widths, strict=True)]
            )
            for layer, values in zip(self.layers_a, self.matrix, strict=True)
        ]
        title = (
            f"{self.method} of {self.kind} RSMs, {name_a} (rows, step {self.step_a}) vs "
            f"{name_b} (columns, step {self.step_b})"
        )
        return "\n".join([title, header, *rows])


def _evaluation(run: Run, evaluation: int, step: int | None, name: str) -> ArchivedEvaluation:
    """The chosen evaluation of a run: the one of ``step``, else the ``evaluation``-th."""
    if isinstance(run, ArchivedEvaluation):
        return run
    steps = archive_steps(run)
    if step is not None:
        if step not in steps:
            raise ValueError(
                f"Expected `step` to be one of run {name}'s archived steps {steps}, but got {step}."
            )
        return load_evaluation(run, step)
    if not -len(steps) <= evaluation < len(steps):
        raise ValueError(
            f"Expected `evaluation` to index run {name}'s {len(steps)} archived evaluations, "
            f"but got {evaluation}."
        )
    return load_evaluation(run, steps[evaluation])


def check_same_probe(a: ArchivedEvaluation, b: ArchivedEvaluation) -> None:
    """Raise :class:`ProbeMismatchError` unless ``a`` and ``b`` cover the same probe samples.

    Same N; equal labels when both have labels; equal sample ids when both have ids (then the
    fingerprints may differ, e.g. two architectures that preprocess the same images
    differently); otherwise equal probe fingerprints.

    Example:
        >>> rsm = {"fc": {"semantic": torch.eye(2)}}
        >>> a = ArchivedEvaluation(0, 0, 0, rsm, None, None, None, "ab12")
        >>> b = ArchivedEvaluation(0, 0, 0, rsm, None, None, None, "cd34")
        >>> try:
        ...     check_same_probe(a, b)
        ... except ProbeMismatchError as error:
        ...     print(error)  # doctest: +ELLIPSIS
        Expected both runs to use the same probe, but their probe fingerprints differ (ab12...
    """
    if a.n != b.n:
        raise ProbeMismatchError(
            f"Expected both runs to use the same probe, but they have {a.n} and {b.n} samples."
        )
    if a.labels is not None and b.labels is not None and not torch.equal(a.labels, b.labels):
        raise ProbeMismatchError(
            "Expected both runs to use the same probe, but their probe labels differ."
        )
    if a.ids is not None and b.ids is not None:
        same = (
            torch.equal(a.ids, b.ids)
            if isinstance(a.ids, Tensor) and isinstance(b.ids, Tensor)
            else a.ids == b.ids
        )
        if not same:
            raise ProbeMismatchError(
                "Expected both runs to use the same probe, but their sample ids differ."
            )
    elif a.fingerprint != b.fingerprint:
        raise ProbeMismatchError(
            "Expected both runs to use the same probe, but their probe fingerprints differ "
            f"({a.fingerprint[:8]}... vs {b.fingerprint[:8]}...)."
        )


def compare_runs(
    run_a: Run,
    run_b: Run,
    *,
    evaluation: int = -1,
    step: int | None = None,
    method: str = "spearman",
    kind: str = "semantic",
) -> RunComparison:
    """Layer x layer RSA of two runs (or two models) on the same probe, from their archives.

    Args:
        run_a: a run's log dir, its ``rsms`` folder, or an evaluation from
            :func:`~lightning_rsm.load_rsms`.
        run_b: the same for the other run.
        evaluation: which archived evaluation of each run (an index in step order; -1: the
            last). Ignored for an :class:`~lightning_rsm.archive.ArchivedEvaluation`.
        step: instead of ``evaluation``, the step whose evaluation both runs must have.
        method: one of ``"cka"``, ``"kendall"``, ``"pearson"``, ``"spearman"``.
        kind: ``"semantic"`` or ``"baseline"``.

    Returns:
        a :class:`RunComparison` with the ``(L_a, L_b)`` matrix.

    Raises:
        ProbeMismatchError: If the two evaluations are of different probes
            (:func:`check_same_probe`).
        ValueError: If ``method`` is unknown, a folder holds no archive, ``evaluation`` or
            ``step`` selects nothing, or a run has no RSM of ``kind``.

    Example:
        >>> from lightning_rsm.archive import ArchivedEvaluation
        >>> a = torch.tensor([[1.0, 0.8, 0.1], [0.8, 1.0, 0.3], [0.1, 0.3, 1.0]])
        >>> run = ArchivedEvaluation(5, 0, 0, {"x": {"semantic": a}, "y": {"semantic": 1 - a}},
        ...                          None, None, None, "ab12")
        >>> compare_runs(run, run).matrix
        tensor([[ 1., -1.],
                [-1.,  1.]])
    """
    check_choice(method, COMPARISON_METHODS, "method")
    a = _evaluation(run_a, evaluation, step, "A")
    b = _evaluation(run_b, evaluation, step, "B")
    check_same_probe(a, b)
    for name, run in {"A": a, "B": b}.items():
        missing = [layer for layer, kinds in run.rsms.items() if kind not in kinds]
        if missing:
            raise ValueError(
                f"Expected run {name} to have {kind!r} RSMs, but layers {missing} have only "
                f"{sorted(run.rsms[missing[0]])}."
            )
    matrix = torch.tensor(
        [
            [float(compare_rsms(ka[kind], kb[kind], method=method)) for kb in b.rsms.values()]
            for ka in a.rsms.values()
        ]
    )
    return RunComparison(matrix, a.layers, b.layers, method, kind, a.step, b.step)


def comparison_figure(result: RunComparison, name_a: str = "A", name_b: str = "B") -> Figure:
    """The layer x layer heatmap: run A's layers down, run B's across, values in the cells.

    Drawn by :func:`~lightning_rsm.plotting.layer_heatmap` (correlations on ``[-1, 1]``, CKA
    on ``[0, 1]``) with a colour bar; the title names the method, the kind of RSM and the steps.

    Example:
        >>> result = RunComparison(torch.eye(2), ["a", "b"], ["a", "b"], "cka", "semantic", 1, 1)
        >>> comparison_figure(result, "seed0", "seed1").axes[0].get_ylabel()
        'seed0 (step 1)'
    """
    from matplotlib.figure import Figure

    from lightning_rsm.plotting import layer_heatmap

    rows, cols = result.matrix.shape
    fig = Figure(figsize=(2.0 + 0.9 * cols, 1.4 + 0.7 * rows), layout="constrained")
    ax = fig.subplots()
    image = layer_heatmap(ax, result.matrix, result.layers_a, result.layers_b, result.method)
    ax.set_xlabel(f"{name_b} (step {result.step_b})")
    ax.set_ylabel(f"{name_a} (step {result.step_a})")
    ax.set_title(f"RSA ({result.method}) of {result.kind} RSMs")
    fig.colorbar(image, ax=ax, label=result.method)
    return fig


def run_name(run: str | os.PathLike) -> str:
    """A short name for a run folder: its own name, or its parent's for an ``rsms`` folder.

    Example:
        >>> run_name("runs/seed0/rsms"), run_name("runs/seed1/")
        ('seed0', 'seed1')
    """
    path = Path(run)
    return path.parent.name if path.name == "rsms" else path.name
