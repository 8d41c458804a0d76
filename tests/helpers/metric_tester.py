"""One tester for every Metric, after torchmetrics' ``MetricTester``.

:func:`check_metric` runs a metric through the checks every metric of the package must pass:
updates in batches equal one update of everything and equal the functional reference;
``forward`` returns the batch's own value and still accumulates; a pickled, cloned or
``state_dict``-restored metric computes the same; moved to every device here (CUDA where there
is one) with its inputs it computes the same, and with float64 states and inputs
(``set_dtype``) it computes the reference of float64 inputs. :func:`check_metric_ddp` checks
that two
ranks holding shards (some possibly empty) compute what one process computes. A metric with
more than ``compute`` to check (``SemanticRSM.rsm``) names it with ``outputs``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

from helpers.ddp import run_processes

Batch = tuple[Tensor, ...]


def _cat(batches: Sequence[Batch]) -> Batch:
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def _update(metric: Metric, batches: Sequence[Batch]) -> Metric:
    for batch in batches:
        metric.update(*batch)
    return metric


def computed(metric: Metric) -> Any:
    """What most metrics give: ``compute()``."""
    return metric.compute()


def check_metric(
    make: Callable[[], Metric],
    batches: Sequence[Batch],
    reference: Callable[..., Any],
    outputs: Callable[[Metric], Any] = computed,
) -> None:
    """Every single-process check; ``reference(*tensors)`` is the functional result of
    ``outputs(metric)``, and ``forward`` gives the batch's ``compute()``, a subset of it."""
    expected = reference(*_cat(batches))
    torch.testing.assert_close(outputs(_update(make(), [_cat(batches)])), expected)
    batched = _update(make(), batches)
    torch.testing.assert_close(outputs(batched), expected)

    forwarded = make()
    for batch in batches:
        value, own = forwarded(*batch), reference(*batch)
        if isinstance(own, dict):  # ``outputs`` may give more than ``compute`` (``rsm()``)
            own = {key: own[key] for key in value}
        torch.testing.assert_close(value, own)
    torch.testing.assert_close(outputs(forwarded), expected)

    torch.testing.assert_close(outputs(pickle.loads(pickle.dumps(batched))), expected)
    torch.testing.assert_close(outputs(batched.clone()), expected)
    batched.persistent(True)
    restored = make()
    restored.persistent(True)
    restored.load_state_dict(batched.state_dict())
    torch.testing.assert_close(outputs(restored), expected)

    for device in _devices():
        moved = make().to(device)
        on_device = [tuple(t.to(device) for t in batch) for batch in batches]
        result = apply_to_collection(outputs(_update(moved, on_device)), Tensor, Tensor.cpu)
        torch.testing.assert_close(result, expected)
    doubles = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    double = make().set_dtype(torch.float64)
    result = outputs(_update(double, doubles))
    torch.testing.assert_close(result, reference(*_cat(doubles)))  # the dtypes too


def _devices() -> list[torch.device]:
    """The CPU, and the first CUDA device where there is one."""
    return [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])


def check_metric_ddp(
    make: Callable[[], Metric],
    shards: Sequence[Sequence[Batch]],
    reference: Callable[..., Any],
    folder: Path,
    outputs: Callable[[Metric], Any] = computed,
) -> None:
    """Rank r updates with ``shards[r]`` (a list of batches, maybe empty); every rank must
    compute the reference of all samples in rank order."""
    folder.mkdir(parents=True, exist_ok=True)
    results = run_processes(
        _compute_shard, make, shards, outputs, folder=folder, world_size=len(shards)
    )
    expected = reference(*_cat([batch for shard in shards for batch in shard]))
    for result in results:
        torch.testing.assert_close(result, expected)


def _compute_shard(
    rank: int,
    make: Callable[[], Metric],
    shards: Sequence[Sequence[Batch]],
    outputs: Callable[[Metric], Any],
) -> Any:
    return outputs(_update(make(), shards[rank]))
