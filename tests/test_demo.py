"""The demo's data and model, the heatmap renderer."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lightning_rsm.demo import DigitsCNN, format_table, shifted_digits, split_probe
from lightning_rsm.plotting import sort_by_label

pytestmark = pytest.mark.oldest  # also run on the oldest versions: make test-oldest


@pytest.fixture(scope="module")
def digits():
    return shifted_digits(seed=0)


def test_digits_are_pasted_whole_at_their_own_offsets(digits):
    images, labels = digits
    from sklearn.datasets import load_digits

    assert images.shape == (1797, 1, 32, 32)
    assert torch.equal(labels, torch.as_tensor(load_digits().target))
    # the bounding box of the ink: a 16 x 16 digit somewhere on the canvas
    rows = (images[:, 0].sum(dim=2) > 0).float()
    first_row = rows.argmax(dim=1)
    assert int(first_row.min()) == 0 and int(first_row.max()) >= 14
    assert len(set(first_row.tolist())) >= 15  # offsets differ from image to image
    cols = (images[:, 0].sum(dim=1) > 0).float()
    assert int((cols.flip(1).argmax(dim=1)).min()) == 0  # some digits touch the right edge


def test_same_seed_same_images_other_seed_other_offsets(digits):
    assert torch.equal(shifted_digits(seed=0)[0], digits[0])
    assert not torch.equal(shifted_digits(seed=1)[0], digits[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 0}, "`scale`"),
        (
            {"canvas": 15, "scale": 2},
            r"`canvas` to be an int of at least 8 \* scale = 16, but got 15",
        ),
    ],
)
def test_shifted_digits_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shifted_digits(**kwargs)


def test_split_probe_is_balanced_disjoint_and_complete(digits):
    _, labels = digits
    probe, train = split_probe(labels, 12)
    assert torch.bincount(labels[probe]).tolist() == [12] * 10
    assert len(set(probe.tolist()) | set(train.tolist())) == len(labels) == len(probe) + len(train)
    with pytest.raises(ValueError, match="more than `per_class` = 200 samples, but got"):
        split_probe(labels, 200)


def test_model_blocks_have_the_documented_shapes():
    model = DigitsCNN(width=4)
    x = torch.zeros(3, 1, 32, 32)
    h1 = model.block1(x)
    h2 = model.block2(h1)
    h3 = model.block3(h2)
    assert [tuple(h.shape[1:]) for h in (h1, h2, h3)] == [(4, 16, 16), (8, 8, 8), (16, 4, 4)]


def test_table_shows_missing_scores_as_dashes():
    row = {
        "epoch": 2,
        "rsm/a/semantic/map": 0.5,
        "rsm/a/semantic/probability_agreement": float("nan"),
    }
    assert format_table([row], ["a"]).splitlines()[1].split() == ["2", "a", "0.500", "-", "-", "-"]


def test_sort_by_label_groups_labels_stably_also_for_multi_hot():
    rsm = torch.arange(16.0).reshape(4, 4)
    by_class = sort_by_label(rsm, torch.tensor([1, 0, 1, 0]))
    assert torch.equal(by_class, rsm[[1, 3, 0, 2]][:, [1, 3, 0, 2]])
    multi_hot = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0]])
    assert torch.equal(sort_by_label(rsm, multi_hot), rsm[[1, 3, 0, 2]][:, [1, 3, 0, 2]])


def test_the_example_script_runs(tmp_path, capsys):
    """examples/custom_model.py, as a user copies it: one epoch."""
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "custom_model.py"))
    history = example["main"](epochs=1, log_dir=str(tmp_path))
    assert [row["epoch"] for row in history] == [0]
    assert {"rsm/stem/semantic/map", "rsm/encoder/vs_pixels"} <= set(history[0])
    assert capsys.readouterr().out.startswith("epoch 0: encoder mAP semantic")
    assert list(tmp_path.glob("version_0/events.out.tfevents.*"))
