"""Run a function in several gloo processes and collect what each rank returns."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_processes(
    fn: Callable[..., Any], *args: Any, folder: Path, world_size: int = 2, timeout_s: int = 60
) -> list[Any]:
    """``[fn(rank, *args) for each rank]``, each run in its own process of one gloo group.

    ``fn`` must be a module-level function. A collective that is not matched on every rank
    fails after ``timeout_s`` seconds instead of hanging the test run.
    """
    mp.spawn(
        _entry,
        args=(fn, args, world_size, str(folder), timeout_s),
        nprocs=world_size,
        join=True,
    )
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _entry(
    rank: int, fn: Callable[..., Any], args: tuple, world_size: int, folder: str, timeout_s: int
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/process_group",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        torch.save(fn(rank, *args), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
