"""Time ``retrieval_average_precision`` against torchmetrics' ``RetrievalMAP`` on the same RSM.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_retrieval.py [--n 5000] [--classes 100]

Both get the same N x N RSM (self-matches removed) and labels; the script checks that the two
mean average precisions agree and prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchmetrics.retrieval import RetrievalMAP

from lightning_rsm.functional import retrieval_average_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of samples (queries)")
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, args.classes, (args.n,), generator=g)
    # Similarity that carries label information, positive (torchmetrics ignores preds <= 0)
    # and without ties (torchmetrics breaks ties arbitrarily, we by index).
    rsm = torch.rand(args.n, args.n, generator=g) + 0.5 * (labels[:, None] == labels[None, :])
    rsm = (rsm + rsm.T) / 2

    start = time.perf_counter()
    ours = retrieval_average_precision(rsm, labels, empty_target_action="neg")
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    off_diagonal = ~torch.eye(args.n, dtype=torch.bool)
    indexes = torch.arange(args.n)[:, None].expand(args.n, args.n)[off_diagonal]
    target = (labels[:, None] == labels[None, :])[off_diagonal]
    reference = RetrievalMAP(empty_target_action="neg")(rsm[off_diagonal], target, indexes=indexes)
    t_reference = time.perf_counter() - start

    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    print(
        f"N = {args.n}, {args.classes} classes, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"mAP: lightning_rsm {ours.item():.6f}   torchmetrics {reference.item():.6f}")
    print(f"lightning_rsm retrieval_average_precision: {t_ours:8.3f} s")
    print(f"torchmetrics RetrievalMAP (incl. index tensors): {t_reference:8.3f} s")
    print(f"ratio torchmetrics / lightning_rsm: {t_reference / t_ours:.1f}x")


if __name__ == "__main__":
    main()
