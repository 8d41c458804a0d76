"""Pure tensor -> tensor functions: representations, matching, RSMs and their quality."""

from lightning_rsm.functional.matching import (
    assignment_upper_bound,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.representations import to_concepts
from lightning_rsm.functional.rsm import semantic_rsm, spatio_semantic_rsm

__all__ = [
    "assignment_upper_bound",
    "match_exact",
    "match_greedy",
    "match_windowed",
    "semantic_rsm",
    "spatio_semantic_rsm",
    "to_concepts",
]
