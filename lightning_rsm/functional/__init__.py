"""Pure tensor -> tensor functions: representations, matching, RSMs and their quality."""

from lightning_rsm.functional.agreement import jensen_shannon_similarity, probability_agreement
from lightning_rsm.functional.comparison import compare_rsms, rsa_matrix
from lightning_rsm.functional.matching import (
    Assignment,
    AssignmentCache,
    LapResult,
    assignment_upper_bound,
    auction_assignment,
    linear_assignment_batch,
    match_exact,
    match_greedy,
    match_windowed,
)
from lightning_rsm.functional.pairs import RSMCancelled
from lightning_rsm.functional.representations import to_concepts
from lightning_rsm.functional.retrieval import (
    retrieval_average_precision,
    retrieval_f1_at_1,
    retrieval_precision,
    retrieval_recall,
)
from lightning_rsm.functional.rsm import semantic_rsm, spatio_semantic_rsm
from lightning_rsm.functional.scores import rsm_scores

__all__ = [
    "Assignment",
    "AssignmentCache",
    "LapResult",
    "RSMCancelled",
    "assignment_upper_bound",
    "auction_assignment",
    "compare_rsms",
    "jensen_shannon_similarity",
    "linear_assignment_batch",
    "match_exact",
    "match_greedy",
    "match_windowed",
    "probability_agreement",
    "retrieval_average_precision",
    "retrieval_f1_at_1",
    "retrieval_precision",
    "retrieval_recall",
    "rsa_matrix",
    "rsm_scores",
    "semantic_rsm",
    "spatio_semantic_rsm",
    "to_concepts",
]
