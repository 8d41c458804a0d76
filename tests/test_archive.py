"""The RSM archive: exact round trips, its documented layout and size, retention, resumes."""

from __future__ import annotations

import os

import pytest
import torch
from archive_runs import LAYERS, write_run

from lightning_rsm import ArchiveWriter, load_rsms, probe_fingerprint
from lightning_rsm.archive import archive_steps, load_evaluation

RSM = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.7], [0.2, 0.7, 1.0]])


def _write(writer: ArchiveWriter, step: int, scale: float = 1.0) -> None:
    writer.write(step=step, epoch=step // 10, rsms={"fc": {"semantic": RSM * scale}})


def test_round_trip_is_exact_and_in_step_order(tmp_path):
    written = write_run(tmp_path, steps=(10, 20, 30), ids=[f"img{i}" for i in range(12)])
    evaluations = load_rsms(tmp_path)
    assert [e.step for e in evaluations] == [10, 20, 30]
    assert [(e.epoch, e.evaluation) for e in evaluations] == [(0, 0), (1, 1), (2, 2)]
    for evaluation in evaluations:
        assert evaluation.layers == list(LAYERS)
        for layer, kinds in written[evaluation.step].items():
            for kind, rsm in kinds.items():
                assert torch.equal(evaluation.rsms[layer][kind], rsm)  # bit for bit
        assert evaluation.labels.tolist() == (torch.arange(12) % 3).tolist()
        assert evaluation.ids == [f"img{i}" for i in range(12)]
        assert evaluation.logits.shape == (12, 3)
        assert evaluation.settings["kernel"] == "cosine"
        assert evaluation.n == 12
    assert load_rsms(tmp_path / "rsms")[0].fingerprint == evaluations[0].fingerprint


def test_a_file_holds_the_documented_keys_and_upper_triangles(tmp_path):
    write_run(tmp_path, steps=(7,))
    (path,) = (tmp_path / "rsms").iterdir()
    assert path.name == "step=0000000007.pt"
    content = torch.load(path, weights_only=True)
    assert set(content) == {
        "format",
        "version",
        "step",
        "epoch",
        "evaluation",
        "n",
        "layers",
        "rsms",
        "labels",
        "logits",
        "ids",
        "fingerprint",
        "settings",
    }
    assert (content["format"], content["version"], content["step"]) == (
        "lightning_rsm.archive",
        1,
        7,
    )
    triangle = content["rsms"]["conv2"]["baseline"]
    assert triangle.dtype == torch.float32 and triangle.shape == (12 * 13 // 2,)
    # 3 layers x 2 kinds of 4 N (N + 1) / 2 bytes, plus a few KB of labels, logits and headers
    assert 6 * 4 * 78 < os.path.getsize(path) < 6 * 4 * 78 + 8192


def test_int_ids_come_back_as_a_tensor(tmp_path):
    writer = ArchiveWriter(tmp_path, fingerprint="ab", ids=torch.tensor([5, 6, 7]))
    _write(writer, 1)
    assert load_rsms(tmp_path)[0].ids.tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    ("keep_every", "keep_last", "kept"),
    [
        (1, 1, list(range(10))),
        (3, 2, [0, 3, 6, 8, 9]),
        (4, 1, [0, 4, 8, 9]),
        (None, 3, [7, 8, 9]),
    ],
)
def test_retention_keeps_every_kth_and_the_last_m(tmp_path, keep_every, keep_last, kept):
    writer = ArchiveWriter(tmp_path, fingerprint="ab", keep_every=keep_every, keep_last=keep_last)
    for number in range(10):
        _write(writer, 10 * (number + 1))
    assert [e.evaluation for e in load_rsms(tmp_path)] == kept
    assert archive_steps(tmp_path) == [10 * (number + 1) for number in kept]


def test_a_resumed_run_continues_the_numbering_and_the_retention(tmp_path):
    writer = ArchiveWriter(tmp_path, fingerprint="ab", keep_every=2, keep_last=1)
    for step in (10, 20, 30):
        _write(writer, step)
    resumed = ArchiveWriter(tmp_path, fingerprint="ab", keep_every=2, keep_last=1)
    for step in (40, 50):
        _write(resumed, step)
    assert [(e.step, e.evaluation) for e in load_rsms(tmp_path)] == [(10, 0), (30, 2), (50, 4)]


def test_writing_a_step_again_replaces_its_file_and_drops_later_steps(tmp_path):
    writer = ArchiveWriter(tmp_path, fingerprint="ab")
    for step in (10, 20, 30):
        _write(writer, step)
    resumed = ArchiveWriter(tmp_path, fingerprint="ab")  # resumed from a checkpoint at step 10
    _write(resumed, 20, scale=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step=0000000010.pt",
        "step=0000000020.pt",
    ]
    again = load_evaluation(tmp_path, 20)
    assert again.evaluation == 1
    assert torch.equal(again.rsms["fc"]["semantic"], RSM * 0.5)


def test_writes_are_atomic_and_stale_temporary_files_are_removed(tmp_path):
    stale = tmp_path / ".tmp-123-step=0000000010.pt"
    stale.write_bytes(b"half a file")
    writer = ArchiveWriter(tmp_path, fingerprint="ab")
    assert not stale.exists()
    _write(writer, 10)
    assert [p.name for p in tmp_path.iterdir()] == ["step=0000000010.pt"]


@pytest.mark.parametrize(
    ("rsms", "message"),
    [
        ({"fc": {"semantic": RSM[:2]}}, r"shape \(2, 2\) like the first RSM, but got \(2, 3\)"),
        ({"fc": {"semantic": RSM + torch.eye(3)[0:1].T}}, "to be symmetric"),
        ({"fc": {"semantic": RSM.masked_fill(RSM == 0.5, float("nan"))}}, "finite"),
        ({"fc": {"semantic": torch.ones(3, 3, dtype=torch.long)}}, "float tensor"),
        ({"fc": {}}, "at least one kind"),
        ({"fc": {"semantic": torch.eye(4)}}, "3 labelled probe samples, but got N = 4"),
    ],
)
def test_write_rejects_what_is_not_an_rsm_of_the_probe(tmp_path, rsms, message):
    writer = ArchiveWriter(tmp_path, fingerprint="ab", labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=message):
        writer.write(step=1, epoch=0, rsms=rsms)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"keep_every": 0}, ValueError, "`keep_every` to be a positive int or None, but got 0"),
        ({"keep_last": None}, ValueError, "`keep_last` to be a positive int, but got None"),
        ({"settings": {"kernel": ["cosine"]}}, TypeError, "'kernel': list"),
        ({"fingerprint": ""}, TypeError, "non-empty str"),
    ],
)
def test_writer_options_are_checked(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        ArchiveWriter(tmp_path, **{"fingerprint": "ab", **options})


def test_ids_must_match_the_probe(tmp_path):
    writer = ArchiveWriter(tmp_path, fingerprint="ab", ids=["a", "b"])
    with pytest.raises(ValueError, match="Expected 3 `ids`, one per probe sample, but got 2"):
        _write(writer, 1)


def test_loading_a_missing_or_foreign_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=r"log dir or its rsms folder, but got .* \(not found\)"):
        load_rsms(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds none") as info:
        load_rsms(tmp_path)
    assert "\n" not in str(info.value)
    torch.save({"something": torch.zeros(1)}, tmp_path / "step=0000000001.pt")
    with pytest.raises(ValueError, match="to be an RSM archive file"):
        load_rsms(tmp_path)


def test_the_fingerprint_tells_probes_apart():
    x, labels = torch.rand(4, 1, 3, 3), torch.tensor([0, 1, 0, 1])
    same = probe_fingerprint(x.clone(), labels.clone())
    assert probe_fingerprint(x, labels) == same
    changed = x.clone()
    changed[3, 0, 2, 2] += 1e-6
    others = [
        probe_fingerprint(changed, labels),
        probe_fingerprint(x, labels.flip(0)),
        probe_fingerprint(x),
        probe_fingerprint(x.reshape(4, 9), labels),
        probe_fingerprint(x.double(), labels),
        probe_fingerprint({"pixel_values": x}, labels),
    ]
    assert len({same, *others}) == 1 + len(others)
    assert probe_fingerprint({"a": x, "b": labels}) == probe_fingerprint({"b": labels, "a": x})
    with pytest.raises(TypeError, match=r"`inputs`\['meta'\] to be a tensor"):
        probe_fingerprint({"meta": "text"})
