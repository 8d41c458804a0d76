"""Linear assignment (LAP) solvers for blocks of score matrices ``(B, S, S)``, behind one contract.

Every solver checks its ``scores`` with :func:`~lightning_rsm.functional.checks.check_scores`
(a real, finite tensor of shape ``(B, S, S)``, S >= 1) and returns an
:class:`~lightning_rsm.functional.matching.assignment.Assignment`
``(value, upper, permutation, duals, rows)``:

- :mod:`~lightning_rsm.functional.matching.assignment`: the result type;
- :mod:`~lightning_rsm.functional.matching.lap`: the exact solver (Jonker-Volgenant compiled with
  numba, :mod:`~lightning_rsm.functional.matching.jonker_volgenant`; scipy without numba), cold or
  warm-started;
- :mod:`~lightning_rsm.functional.matching.warm_start`: :class:`AssignmentCache`, each pair's last
  solution kept between evaluations of an RSM;
- :mod:`~lightning_rsm.functional.matching.matchers`: the matchers of ``semantic_rsm`` (exact,
  windowed, greedy) and the cheap upper bound;
- :mod:`~lightning_rsm.functional.matching.auction`: the batched epsilon-scaling auction in torch.
"""

from lightning_rsm.functional.matching.assignment import Assignment
from lightning_rsm.functional.matching.auction import auction_assignment
from lightning_rsm.functional.matching.lap import HAVE_NUMBA, LapResult, linear_assignment_batch
from lightning_rsm.functional.matching.matchers import (
    assignment_upper_bound,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.matching.warm_start import AssignmentCache

__all__ = [
    "HAVE_NUMBA",
    "Assignment",
    "AssignmentCache",
    "LapResult",
    "assignment_upper_bound",
    "auction_assignment",
    "linear_assignment_batch",
    "match_exact",
    "match_greedy",
    "match_windowed",
]
