"""Linear assignment (LAP) solvers for blocks of score matrices ``(B, S, S)``.

- :mod:`~lightning_rsm.functional.matching.lap`: the exact solver (Jonker-Volgenant compiled with
  numba, :mod:`~lightning_rsm.functional.matching.jonker_volgenant`; scipy without numba), cold or
  warm-started;
- :mod:`~lightning_rsm.functional.matching.warm_start`: :class:`AssignmentCache`, each pair's last
  solution kept between evaluations of an RSM;
- :mod:`~lightning_rsm.functional.matching.matchers`: the matchers of ``semantic_rsm`` (exact,
  windowed, greedy) and the cheap upper bound;
- :mod:`~lightning_rsm.functional.matching.auction`: the batched epsilon-scaling auction in torch.
"""

from lightning_rsm.functional.matching.auction import auction_assignment
from lightning_rsm.functional.matching.lap import HAVE_NUMBA, LapResult, linear_assignment_batch
from lightning_rsm.functional.matching.matchers import (
    MatchResult,
    assignment_upper_bound,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.matching.warm_start import AssignmentCache

__all__ = [
    "HAVE_NUMBA",
    "AssignmentCache",
    "LapResult",
    "MatchResult",
    "assignment_upper_bound",
    "auction_assignment",
    "linear_assignment_batch",
    "match_exact",
    "match_greedy",
    "match_windowed",
]
