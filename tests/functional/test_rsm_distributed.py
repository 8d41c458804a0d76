"""semantic_rsm split across 2 gloo processes equals the single-process RSM exactly; without
``distributed=True`` it runs no collective, so one rank alone can call it; given a group of its
own, it runs beside other collectives on the default group."""

import threading

import pytest
import torch
import torch.distributed as dist
from helpers.ddp import run_processes

import lightning_rsm.functional.pairs as pairs_module
from lightning_rsm.functional import semantic_rsm

CASES = [("cosine", "exact"), ("rbf", "greedy"), ("inner", "windowed"), ("cosine", "auction")]


def features() -> torch.Tensor:
    return torch.randn(11, 6, 3, 3, generator=torch.Generator().manual_seed(0)).relu()


def _split(rank: int) -> list[torch.Tensor]:
    return [
        semantic_rsm(
            features(), kernel=k, matcher=m, window=3, block_size=4, num_workers=1, distributed=True
        )
        for k, m in CASES
    ]


def test_two_ranks_give_the_single_process_rsm(tmp_path):
    expected = [
        semantic_rsm(features(), kernel=k, matcher=m, window=3, block_size=4, num_workers=1)
        for k, m in CASES
    ]
    for got in run_processes(_split, folder=tmp_path):
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)


def _in_own_group_beside_training(rank: int) -> list[torch.Tensor]:
    """A thread solves in a gloo group of its own while this thread all-reduces on the default
    group (as training does): had the RSM used the default group, the ranks' collectives would
    pair up wrongly and fail or time out."""
    group = dist.new_group(backend="gloo")
    results: list[torch.Tensor] = []

    def solve() -> None:
        results.extend(
            semantic_rsm(
                features(),
                kernel=k,
                matcher=m,
                window=3,
                block_size=4,
                num_workers=1,
                distributed=group,
            )
            for k, m in CASES
        )

    worker = threading.Thread(target=solve)
    worker.start()
    total = torch.zeros(1)
    for _ in range(200):
        step = torch.ones(1)
        dist.all_reduce(step)
        total += step
    worker.join()
    assert total.item() == 200 * dist.get_world_size()
    return results


def test_a_group_of_its_own_gives_the_single_process_rsm_beside_training(tmp_path):
    expected = [
        semantic_rsm(features(), kernel=k, matcher=m, window=3, block_size=4, num_workers=1)
        for k, m in CASES
    ]
    for got in run_processes(_in_own_group_beside_training, folder=tmp_path, timeout_s=30):
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)


def _rank_zero_only(rank: int) -> torch.Tensor | None:
    """The `if trainer.is_global_zero:` pattern: only rank 0 calls, with the defaults."""
    return semantic_rsm(features(), num_workers=1) if rank == 0 else None


def test_one_rank_alone_gets_its_answer_by_default(tmp_path):
    got = run_processes(_rank_zero_only, folder=tmp_path, timeout_s=20)
    torch.testing.assert_close(got[0], semantic_rsm(features()))
    assert got[1] is None


def _fails_on_rank_one(rank: int) -> str:
    """Rank 1's solver runs out of memory after every input check has passed."""
    if rank == 1:

        def out_of_memory(*args):
            raise MemoryError("out of memory in the solver")

        pairs_module._MATCHERS["exact"] = out_of_memory  # the registry is read at call time
    try:
        semantic_rsm(features(), block_size=4, num_workers=1, distributed=True)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def test_a_failure_on_one_rank_raises_on_every_rank(tmp_path):
    messages = run_processes(_fails_on_rank_one, folder=tmp_path, timeout_s=20)
    assert messages[1].startswith("MemoryError: out of memory in the solver")
    assert messages[0].startswith("RuntimeError: semantic_rsm failed on rank 1 (MemoryError")


def test_distributed_true_needs_a_process_group():
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        semantic_rsm(features(), distributed=True)
    with pytest.raises(
        TypeError,
        match="`distributed` to be a bool or a ProcessGroup, but got None",
    ):
        semantic_rsm(features(), distributed=None)
