"""`lightning-rsm compute` and `demo` on real files; errors are one line, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_data
from PIL import Image

from lightning_rsm.cli import build_parser, main
from lightning_rsm.functional import (
    probability_agreement,
    retrieval_average_precision,
    semantic_rsm,
    spatio_semantic_rsm,
)


@pytest.fixture
def saved(tmp_path):
    """A dict file: two layers of different shapes, labels and logits."""
    images, labels = make_data(10, seed=3)
    layers = {"conv": torch.relu(images.repeat(1, 2, 1, 1) - 0.5), "tokens": torch.rand(10, 5, 3)}
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "features.pt"
    torch.save({**layers, "labels": labels, "logits": logits}, path)
    return path, layers, labels, logits


def test_compute_writes_rsms_and_a_heatmap_and_prints_the_scores(saved, tmp_path, capsys):
    path, layers, labels, logits = saved
    out = tmp_path / "out" / "rsms.pt"
    assert main(["compute", str(path), "-o", str(out), "--max-positions", "16"]) == 0
    rsms = torch.load(out, weights_only=True)
    assert sorted(rsms) == ["conv/baseline", "conv/semantic", "tokens/baseline", "tokens/semantic"]
    printed = capsys.readouterr().out
    for layer, x in layers.items():
        expected = {
            "semantic": semantic_rsm(x, max_positions=16),
            "baseline": spatio_semantic_rsm(x if layer == "tokens" else _pooled(x, 16)),
        }
        for kind, rsm in expected.items():
            torch.testing.assert_close(rsms[f"{layer}/{kind}"], rsm)
            m_ap = float(retrieval_average_precision(rsm, labels))
            agree = float(probability_agreement(rsm, logits))
            row = next(r for r in printed.splitlines() if r.split()[:2] == [layer, kind])
            assert row.split()[2] == f"{m_ap:.3f}"
            assert row.split()[4] == f"{agree:.3f}"
    image = Image.open(out.with_suffix(".png"))
    assert image.size[0] > 100 and image.size[1] > 100


def _pooled(x: torch.Tensor, max_positions: int) -> torch.Tensor:
    from lightning_rsm.functional import to_concepts

    return to_concepts(x, max_positions=max_positions)


def test_compute_on_a_plain_tensor_without_labels(tmp_path, capsys):
    path = tmp_path / "x.pt"
    x = torch.rand(6, 4)
    torch.save(x, path)
    assert main(["compute", str(path), "-o", str(tmp_path / "r.pt"), "--no-baseline"]) == 0
    rsms = torch.load(tmp_path / "r.pt", weights_only=True)
    assert list(rsms) == ["features/semantic"]
    torch.testing.assert_close(rsms["features/semantic"], semantic_rsm(x))
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["features", "semantic", "-", "-", "-"]


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        (b"plain text", "could not be loaded"),
        (NotATensor(), "could not be loaded (UnpicklingError"),
        ({"conv": torch.rand(4, 3), "note": 3}, "non-tensor entries ['note']"),
        ({"labels": torch.arange(4)}, "at least one layer besides"),
        ([torch.rand(3, 3)], "a tensor or a dict"),
        ({"bad": torch.rand(5)}, "layer 'bad': Expected `bad` to be representations"),
        ({"bad": torch.full((3, 4), float("nan"))}, "layer 'bad': Expected `bad` to be finite"),
    ],
)
def test_compute_reports_a_bad_file_in_one_line(tmp_path, capsys, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert main(["compute", str(path), "-o", str(tmp_path / "r.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-rsm compute: error: ")
    assert err.count("\n") == 1
    assert match in err, err
    assert not (tmp_path / "r.pt").exists()


def test_compute_reports_an_unwritable_output_in_one_line(saved, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compute", str(saved[0]), "-o", str(blocker / "rsms.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-rsm compute: error: Expected OUT to be a writable file path")
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--help"], ["compute", "--help"], ["demo", "--help"]])
def test_help_for_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lightning-rsm")


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compute", "f.pt", "-o", "o.pt", "--max-positions", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive int, but got '0'" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_rsm", "compute", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lightning-rsm compute" in result.stdout


def _numpy_file(path):
    import numpy as np

    np.save(path, np.zeros((4, 3, 2, 2)))


def _pickle_file(path):
    import pickle

    import numpy as np

    path.write_bytes(pickle.dumps(np.zeros(3), protocol=4))


@pytest.mark.parametrize("write", [_numpy_file, _pickle_file])
def test_a_foreign_file_is_one_clean_line(write, tmp_path):
    path = tmp_path / "features.npy"
    write(path)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_rsm", "compute", str(path), "-o", str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "\x1b" not in result.stderr
    assert result.stderr.startswith("lightning-rsm compute: error: Expected")
    assert "(UnpicklingError: Weights only load failed)" in result.stderr


def test_defaults_are_the_callback_defaults_and_shown_by_help(capsys):
    from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS

    args = build_parser().parse_args(["compute", "f.pt", "-o", "o.pt"])
    assert args.max_positions == DEFAULT_MAX_POSITIONS == 64
    assert args.progress is None  # a bar exactly when stderr is a terminal
    assert (
        build_parser()
        .parse_args(["compute", "f.pt", "-o", "o", "--max-positions", "none"])
        .max_positions
        is None
    )
    with pytest.raises(SystemExit):
        main(["compute", "--help"])
    assert "(default: 64)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_progress_bar_on_request(saved, tmp_path, capsys, flag):
    assert main(["compute", str(saved[0]), "-o", str(tmp_path / "r.pt"), flag]) == 0
    assert ("semantic RSM" in capsys.readouterr().err) == (flag == "--progress")
