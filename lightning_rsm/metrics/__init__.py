"""torchmetrics ``Metric`` wrappers: accumulate representations, reduce across ranks, score."""

from lightning_rsm.metrics.agreement import ProbabilityAgreement
from lightning_rsm.metrics.comparison import RSMComparison
from lightning_rsm.metrics.semantic_rsm import SemanticRSM

__all__ = ["ProbabilityAgreement", "RSMComparison", "SemanticRSM"]
