"""The block runner behind semantic_rsm: core count on every platform, cancellation, Ctrl-C."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from lightning_rsm.functional import AssignmentCache, RSMCancelled, semantic_rsm
from lightning_rsm.functional.pairs import available_cpus


def _maps(n: int = 24) -> torch.Tensor:
    return torch.randn(n, 6, 3, 3, generator=torch.Generator().manual_seed(0)).relu()


def _solver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lightning_rsm")]


@pytest.mark.parametrize(
    "missing", [("process_cpu_count",), ("process_cpu_count", "sched_getaffinity")]
)
def test_default_threads_without_linux_only_functions(monkeypatch, missing):
    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    assert available_cpus() == (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    x = _maps(6)
    torch.testing.assert_close(semantic_rsm(x), semantic_rsm(x, num_workers=1))


def test_cpu_count_of_none_means_one(monkeypatch):
    for name in ("process_cpu_count", "sched_getaffinity"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert available_cpus() == 1


@pytest.mark.parametrize("num_workers", [1, 2])
def test_should_stop_cancels_between_blocks_and_leaves_no_thread(num_workers):
    asked = []

    def stop_after_first_block() -> bool:
        asked.append(True)
        return len(asked) > 1

    with pytest.raises(RSMCancelled, match=r"`should_stop` returned True with \d+ of 276 blocks"):
        semantic_rsm(
            _maps(), block_size=1, num_workers=num_workers, should_stop=stop_after_first_block
        )
    assert not _solver_threads()


def test_an_event_stops_a_computation_running_on_another_thread():
    stop = threading.Event()
    outcome: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        def should_stop() -> bool:
            started.set()
            return stop.is_set()

        try:
            semantic_rsm(_maps(60), block_size=1, num_workers=2, should_stop=should_stop)
        except RSMCancelled as error:
            outcome.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30)
    stop.set()
    worker.join(30)
    assert not worker.is_alive()
    assert len(outcome) == 1
    assert not _solver_threads()


@pytest.mark.parametrize("num_workers", [1, 2])
def test_ctrl_c_between_blocks_propagates_and_leaves_no_thread(num_workers):
    calls = []

    def interrupt_after_first_block() -> bool:
        calls.append(True)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        semantic_rsm(
            _maps(), block_size=1, num_workers=num_workers, should_stop=interrupt_after_first_block
        )
    assert not _solver_threads()


def test_a_cancelled_warm_start_stays_exact():
    x = _maps(10)
    cache = AssignmentCache()
    calls = []
    with pytest.raises(RSMCancelled):
        semantic_rsm(
            x,
            warm_start=cache,
            block_size=3,
            num_workers=1,
            should_stop=lambda: len(calls.append(0) or calls) > 3,
        )
    torch.testing.assert_close(semantic_rsm(x + 0.01, warm_start=cache), semantic_rsm(x + 0.01))


def test_should_stop_false_changes_nothing():
    x = _maps(8)
    assert torch.equal(semantic_rsm(x, should_stop=lambda: False), semantic_rsm(x))
