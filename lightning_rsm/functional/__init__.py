"""Pure tensor -> tensor functions: representations, matching, RSMs and their quality."""

from lightning_rsm.functional.representations import to_concepts
from lightning_rsm.functional.retrieval import (
    retrieval_average_precision,
    retrieval_f1_at_1,
    retrieval_precision,
    retrieval_recall,
)

__all__ = [
    "retrieval_average_precision",
    "retrieval_f1_at_1",
    "retrieval_precision",
    "retrieval_recall",
    "to_concepts",
]
