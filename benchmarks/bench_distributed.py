"""Scaling of semantic_rsm over torch.distributed ranks (gloo, CPU, one thread per rank).

Run: ``python benchmarks/bench_distributed.py [--n 1000] [--side 7]``

Times the same RSM with 1 rank and with 2 ranks in one run, each rank using one solver thread
and one torch thread, and checks that both give the identical matrix. The time of a rank is
from a barrier after start-up to the end of the gather, so process start-up is not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_rsm.functional import semantic_rsm  # noqa: E402


def features(n: int, side: int) -> torch.Tensor:
    return torch.randn(n, 256, side, side, generator=torch.Generator().manual_seed(0)).relu()


def _rank(rank: int, world: int, init_file: str, out_dir: str, n: int, side: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = features(n, side)
    dist.barrier()
    start = time.perf_counter()
    rsm = semantic_rsm(x, num_workers=1)
    seconds = time.perf_counter() - start
    if rank == 0:
        torch.save({"rsm": rsm, "seconds": seconds}, os.path.join(out_dir, f"world{world}.pt"))
    dist.destroy_process_group()


def run(world: int, n: int, side: int, out_dir: str) -> dict:
    init_file = os.path.join(out_dir, f"init{world}")
    mp.spawn(_rank, args=(world, init_file, out_dir, n, side), nprocs=world, join=True)
    return torch.load(os.path.join(out_dir, f"world{world}.pt"), weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--side", type=int, default=7, help="feature map side (S = side^2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        one = run(1, args.n, args.side, out_dir)
        two = run(2, args.n, args.side, out_dir)
    pairs = args.n * (args.n - 1) // 2
    print(f"# N = {args.n}, S = {args.side**2}, C = 256, cosine, exact; {os.cpu_count()} cores")
    print("| ranks | seconds | us per pair | time vs 1 rank |")
    print("|---|---|---|---|")
    for world, result in ((1, one), (2, two)):
        t = result["seconds"]
        print(f"| {world} | {t:.1f} | {1e6 * t / pairs:.1f} | {t / one['seconds']:.2f}x |")
    print(f"identical RSM on 1 and 2 ranks: {torch.equal(one['rsm'], two['rsm'])}")


if __name__ == "__main__":
    main()
