"""`compare_runs` and `lightning-rsm compare`: layer x layer RSA of two runs on one probe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from archive_runs import LAYERS, write_run
from PIL import Image

from lightning_rsm import compare_runs, load_rsms
from lightning_rsm.archive import ArchiveWriter
from lightning_rsm.functional import compare_rsms
from lightning_rsm.run_comparison import ProbeMismatchError


@pytest.fixture
def runs(tmp_path):
    written = {
        name: write_run(tmp_path / name, seed=seed, steps=(10, 20))
        for name, seed in (("seed0", 0), ("seed1", 1))
    }
    return tmp_path, written


@pytest.mark.parametrize("method", ["spearman", "cka", "pearson", "kendall"])
def test_each_cell_is_the_functional_comparison_of_two_layers(runs, method):
    root, written = runs
    result = compare_runs(root / "seed0", root / "seed1", method=method)
    assert (result.layers_a, result.layers_b) == (list(LAYERS), list(LAYERS))
    assert (result.step_a, result.step_b, result.method) == (20, 20, method)  # the last one
    for i, a in enumerate(LAYERS):
        for j, b in enumerate(LAYERS):
            expected = compare_rsms(
                written["seed0"][20][a]["semantic"],
                written["seed1"][20][b]["semantic"],
                method=method,
            )
            assert float(result.matrix[i, j]) == pytest.approx(float(expected), abs=1e-6)


def test_the_evaluation_the_step_and_the_kind_are_chosen(runs):
    root, written = runs
    first = compare_runs(root / "seed0", root / "seed1" / "rsms", evaluation=0, kind="baseline")
    by_step = compare_runs(root / "seed0", root / "seed1", step=10, kind="baseline")
    assert torch.equal(first.matrix, by_step.matrix)
    expected = compare_rsms(
        written["seed0"][10]["conv1"]["baseline"], written["seed1"][10]["pool"]["baseline"]
    )
    assert float(first.matrix[0, 2]) == pytest.approx(float(expected), abs=1e-6)
    loaded = load_rsms(root / "seed0")[0]
    assert torch.equal(
        compare_runs(loaded, loaded, kind="baseline").matrix.diagonal(), torch.ones(3)
    )
    with pytest.raises(ValueError, match=r"archived steps \[10, 20\], but got 15"):
        compare_runs(root / "seed0", root / "seed1", step=15)
    with pytest.raises(ValueError, match="index run A's 2 archived evaluations, but got 2"):
        compare_runs(root / "seed0", root / "seed1", evaluation=2)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"n": 15}, "they have 12 and 15 samples"),
        ({"probe_seed": 4}, "probe fingerprints differ"),
    ],
)
def test_archives_of_different_probes_are_an_error(runs, other, message):
    root, _ = runs
    write_run(root / "other", **other)
    with pytest.raises(ProbeMismatchError, match=message):
        compare_runs(root / "seed0", root / "other")


def test_labels_must_agree_and_ids_vouch_for_the_same_samples(tmp_path):
    rsm = {"fc": {"semantic": torch.tensor([[1.0, 0.2, 0.1], [0.2, 1.0, 0.4], [0.1, 0.4, 1.0]])}}

    def run(name, fingerprint, labels, ids):
        writer = ArchiveWriter(tmp_path / name, fingerprint=fingerprint, labels=labels, ids=ids)
        writer.write(step=1, epoch=0, rsms=rsm)
        return tmp_path / name

    labels = torch.tensor([0, 1, 1])
    a = run("a", "f1", labels, ["x", "y", "z"])
    other_preprocessing = run("b", "f2", labels, ["x", "y", "z"])  # same ids: same samples
    assert compare_runs(a, other_preprocessing).matrix.tolist() == [[1.0]]
    with pytest.raises(ProbeMismatchError, match="sample ids differ"):
        compare_runs(a, run("c", "f1", labels, ["x", "z", "y"]))
    with pytest.raises(ProbeMismatchError, match="probe labels differ"):
        compare_runs(a, run("d", "f1", torch.tensor([1, 1, 0]), None))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_rsm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )


def test_cli_prints_the_table_and_draws_the_heatmap(runs):
    root, _ = runs
    picture = root / "figures" / "seeds.png"
    done = _cli(
        "compare", str(root / "seed0"), str(root / "seed1"), "-o", str(picture), "--method", "cka"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "cka of semantic RSMs, seed0 (rows, step 20) vs seed1 (columns, step 20)"
    assert lines[1].split()[3:] == list(LAYERS)
    expected = compare_runs(root / "seed0", root / "seed1", method="cka").matrix
    for row, layer, values in zip(lines[2:5], LAYERS, expected, strict=True):
        assert row.split() == [layer, *(f"{float(v):.3f}" for v in values)]
    image = Image.open(picture)
    assert image.size[0] > 200 and image.size[1] > 150


def test_cli_refuses_archives_of_different_probes_with_exit_status_2(runs):
    root, _ = runs
    write_run(root / "other", probe_seed=4)
    done = _cli("compare", str(root / "seed0"), str(root / "other"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        "lightning-rsm compare: error: Expected both runs to use the same"
    )


def test_cli_reports_a_missing_run_in_one_line(runs):
    root, _ = runs
    done = _cli("compare", str(root / "seed0"), str(root / "nowhere"), "--step", "10")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "(not found)" in done.stderr
