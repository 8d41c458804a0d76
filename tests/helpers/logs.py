"""Readers of what real loggers wrote (offline): the step of every value of a key or image tag."""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import time
from collections import defaultdict

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tensorboard_steps(log_dir: str) -> dict[str, list[int]]:
    """Scalar and image tag -> the steps it was written at, from the event files in ``log_dir``."""
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    steps.update({tag: [e.step for e in events.Images(tag)] for tag in tags["images"]})
    return steps


def csv_rows(log_dir: str, key: str) -> list[dict[str, str]]:
    """The rows of a ``CSVLogger``'s ``metrics.csv`` that hold ``key``."""
    with open(os.path.join(log_dir, "metrics.csv")) as file:
        return [row for row in csv.DictReader(file) if row.get(key)]


def csv_steps(log_dir: str, key: str) -> list[int]:
    return [int(row["step"]) for row in csv_rows(log_dir, key)]


def csv_image_steps(log_dir: str, tag: str) -> list[int]:
    """Steps of the PNG files a ``CSVLogger`` got for ``tag`` (see ``image_file_name``)."""
    stem = tag.replace("/", "__") + "_step"
    names = sorted(os.listdir(os.path.join(log_dir, "rsm")))
    return [int(name[len(stem) : -len(".png")]) for name in names if name.startswith(stem)]


def _wandb_records(path: str) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records have a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B", path
    records, parts, offset, block = [], [], 7, 32768
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:
            offset += room
            continue
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7])
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        parts.append(payload)
        if kind in (1, 4):
            records.append(b"".join(parts))
            parts = []
        elif kind == 0:
            break
    return records


def _wandb_run(path: str, timeout_s: float = 60) -> list:
    """The records of a finished offline run; W&B's service may still be writing the file after
    ``wandb.finish()`` returns, so wait for its exit record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s  # a guard against a hang, not a measurement
    while True:
        records = []
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.1)


def wandb_steps(save_dir: str) -> dict[str, list[int]]:
    """Key -> the ``trainer/global_step`` of each of its values (scalars and images) in the
    offline W&B run under ``save_dir``."""
    (path,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "*.wandb"))
    steps: dict[str, list[int]] = defaultdict(list)
    for record in _wandb_run(path):
        if record.WhichOneof("record_type") != "history":
            continue
        # a scalar is one item; an image is an item per field, its key the first part
        row = {
            item.key or item.nested_key[0]: json.loads(item.value_json)
            for item in record.history.item
        }
        for key in row:
            if not key.startswith(("_", "trainer/")):
                steps[key].append(int(row["trainer/global_step"]))
    return dict(steps)


def mlflow_steps(client, run_id: str, key: str) -> list[int]:
    """Steps of a metric, or of a stepped image: artifact ``images/<key>+step+<n>+...`` with
    ``/`` as ``~`` (MLflow 2.15 on), ``images/<key>%step%<n>%...`` with ``/`` as ``#`` before."""
    metric = [m.step for m in client.get_metric_history(run_id, key)]
    if metric:
        return metric
    paths = [a.path for a in client.list_artifacts(run_id, "images")]
    steps = set()
    for slash, sep in (("~", "+"), ("#", "%")):
        prefix = f"images/{key.replace('/', slash)}{sep}step{sep}"
        steps |= {int(p[len(prefix) :].split(sep)[0]) for p in paths if p.startswith(prefix)}
    return sorted(steps)
