"""The example scripts, run briefly as a user copies them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_transformer_tokens_example_runs(tmp_path, capsys):
    """Dict batches, a keyword forward, CLS + 8 x 8 token layers, a probe from validation data,
    an evaluation every 10 steps."""
    example = runpy.run_path(str(EXAMPLES / "transformer_tokens.py"))
    history = example["main"](
        steps=10, every_n_train_steps=10, probe_size=30, log_dir=str(tmp_path)
    )
    assert [row["step"] for row in history] == [10]
    assert "rsm/blocks.1/semantic/probability_agreement" in history[0]
    assert capsys.readouterr().out.startswith("step 10: blocks.1 mAP semantic")
    assert list(tmp_path.glob("version_0/events.out.tfevents.*"))


def test_compiled_cnn_example_runs(capsys):
    """trainer.fit(torch.compile(model)) with Inductor on CPU: a few batches of one epoch."""
    example = runpy.run_path(str(EXAMPLES / "compiled_cnn.py"))
    history = example["main"](epochs=1, limit_train_batches=2)
    assert [row["epoch"] for row in history] == [0]
    assert {"rsm/layer1/semantic/map", "rsm/layer2/baseline/map"} <= set(history[0])
    assert capsys.readouterr().out.startswith("epoch 0: layer2 mAP semantic")


def test_compare_runs_example_runs(tmp_path, capsys):
    """Two seeds with save_rsms=True, then compare_runs: a table and a figure."""
    example = runpy.run_path(str(EXAMPLES / "compare_runs.py"))
    figure = tmp_path / "seeds.png"
    result = example["main"](
        epochs=1, per_class=3, train_size=64, log_dir=str(tmp_path), figure=str(figure)
    )
    assert result.layers_a == result.layers_b == ["block1", "block2", "block3"]
    assert result.matrix.shape == (3, 3) and bool(result.matrix.isfinite().all())
    assert sorted(path.name for path in tmp_path.glob("seed*/rsms/*.pt")) == [
        "step=0000000002.pt",
        "step=0000000002.pt",
    ]
    out = capsys.readouterr().out
    assert "seed 0 \\ seed 1  block1  block2  block3" in out
    assert figure.stat().st_size > 10_000
