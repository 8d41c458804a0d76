"""Pure tensor -> tensor functions: representations, matching, RSMs and their quality."""

from lightning_rsm.functional.agreement import jensen_shannon_similarity, probability_agreement
from lightning_rsm.functional.comparison import compare_rsms
from lightning_rsm.functional.representations import to_concepts
from lightning_rsm.functional.retrieval import (
    retrieval_average_precision,
    retrieval_f1_at_1,
    retrieval_precision,
    retrieval_recall,
)

__all__ = [
    "compare_rsms",
    "jensen_shannon_similarity",
    "probability_agreement",
    "retrieval_average_precision",
    "retrieval_f1_at_1",
    "retrieval_precision",
    "retrieval_recall",
    "to_concepts",
]
