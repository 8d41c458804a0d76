"""Stand-in for ``semantic_rsm(..., matcher="auction")`` until the matcher is wired on main.

Registers the batched auction (:func:`lightning_rsm.functional.auction.auction_assignment`)
in ``semantic_rsm``'s matcher registry so that the benchmarks run it through exactly the same
block formation, kernels and ``return_gap`` path as the other matchers. The tolerance is on
the cosine scale: the raw tolerance of pair (i, j) is ``tol * |X_i| * |Y_j|``, so with
``kernel="cosine"`` and ``return_gap=True`` every gap is at most ``tol``.
"""

from __future__ import annotations

import torch

from lightning_rsm.functional import rsm
from lightning_rsm.functional.auction import auction_assignment


def ensure_auction_matcher(tol: float = 1e-4) -> None:
    """Register ``matcher="auction"`` with cosine tolerance ``tol`` unless main already has it."""
    if "auction" in rsm._MATCHERS:
        return

    def solve(scores, norms_x, norms_y, options):
        scale = (norms_x.double().norm(dim=1) * norms_y.double().norm(dim=1)).clamp_min(1e-300)
        value, upper, _ = auction_assignment(scores, tol=tol * scale)
        return value, upper

    rsm._MATCHERS["auction"] = solve


def auction_block_size(size: int, device: torch.device) -> int:
    """Pairs per block: as many as half the free GPU memory holds (the auction's cost per
    bidding round is mostly fixed, so bigger blocks amortise it); 4096 // (S / 49)^2 on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, min(1_000_000, free // 2 // (40 * size * size)))
    return max(64, 4096 * 49 * 49 // (size * size))
