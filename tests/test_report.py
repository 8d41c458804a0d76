"""`lightning-rsm report`: an archive's scores and pictures, redrawn offline into one folder."""

from __future__ import annotations

import csv

import pytest
import torch
from archive_runs import LAYERS, write_run
from PIL import Image

from lightning_rsm import load_rsms
from lightning_rsm.cli import main
from lightning_rsm.functional import compare_rsms, rsm_scores
from lightning_rsm.report import write_report


def test_report_writes_scores_trajectories_heatmaps_and_layer_rsa(tmp_path, capsys):
    write_run(tmp_path / "run", steps=(10, 20, 30))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "run"), "-o", str(out)]) == 0
    heatmaps = [f"rsm__{layer}__heatmap_step00000030.png" for layer in LAYERS]
    assert capsys.readouterr().out == f"wrote {3 + len(LAYERS)} files to {out}\n"
    expected = {"scores.csv", "trajectories.png", "rsm__layer_rsa_step00000030.png", *heatmaps}
    assert {path.name for path in out.iterdir()} == expected
    for name in expected - {"scores.csv"}:
        width, height = Image.open(out / name).size
        assert width >= 256 and height >= 256


def test_report_scores_are_the_functional_scores_of_the_archived_rsms(tmp_path):
    written = write_run(tmp_path, steps=(10, 20))
    write_report(tmp_path, tmp_path / "report")
    with (tmp_path / "report" / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    evaluations = {e.step: e for e in load_rsms(tmp_path)}
    values = {(int(r["step"]), r["layer"], r["kind"], r["score"]): float(r["value"]) for r in rows}
    for step, rsms in written.items():
        e = evaluations[step]
        for layer, kinds in rsms.items():
            for kind, rsm in kinds.items():
                for score, value in rsm_scores(rsm, e.labels, e.logits).items():
                    assert values[(step, layer, kind, score)] == pytest.approx(float(value))
    drift = compare_rsms(written[20]["conv2"]["semantic"], written[10]["conv2"]["semantic"])
    assert values[(20, "conv2", "semantic", "rsa_to_previous")] == pytest.approx(float(drift))
    assert (10, "conv2", "semantic", "rsa_to_previous") not in values


def test_report_draws_the_chosen_evaluation(tmp_path):
    write_run(tmp_path, steps=(10, 20))
    written = write_report(tmp_path, tmp_path / "by_index", evaluation=0)
    assert "rsm__pool__heatmap_step00000010.png" in {p.name for p in written}
    assert write_report(tmp_path, tmp_path / "by_step", step=10)[-1].name.endswith("00010.png")
    with pytest.raises(ValueError, match=r"archived steps \[10, 20\], but got 15"):
        write_report(tmp_path, tmp_path / "nothing", step=15)


def test_report_of_a_folder_without_archive_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lightning-rsm report: error: Expected") and error.count("\n") == 1


def test_a_single_layer_archive_has_no_layer_rsa(tmp_path):
    from lightning_rsm.archive import ArchiveWriter

    writer = ArchiveWriter(tmp_path, fingerprint="ab", labels=torch.tensor([0, 1, 0, 1]))
    writer.write(step=5, epoch=0, rsms={"fc": {"semantic": torch.eye(4)}})
    names = {p.name for p in write_report(tmp_path, tmp_path / "out")}
    assert names == {
        "scores.csv",
        "trajectories.png",
        "rsm__fc__heatmap_step00000005.png",
    }
