"""semantic_rsm split across 2 gloo processes equals the single-process RSM exactly."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_rsm.functional import semantic_rsm

CASES = [("cosine", "exact"), ("rbf", "greedy"), ("inner", "windowed"), ("cosine", "auction")]


def features() -> torch.Tensor:
    return torch.randn(11, 6, 3, 3, generator=torch.Generator().manual_seed(0)).relu()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = [
            semantic_rsm(features(), kernel=k, matcher=m, window=3, block_size=4, num_workers=1)
            for k, m in CASES
        ]
        if rank == 0:  # rank-zero-only code must opt out of splitting, or it would wait forever
            results.append(semantic_rsm(features(), distributed=False))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_single_process_rsm(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = [
        semantic_rsm(features(), kernel=k, matcher=m, window=3, block_size=4, num_workers=1)
        for k, m in CASES
    ]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        if rank == 0:
            torch.testing.assert_close(got.pop(), semantic_rsm(features()))
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)


def test_distributed_true_needs_a_process_group():
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        semantic_rsm(features(), distributed=True)
