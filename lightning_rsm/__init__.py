"""Permutation-invariant (semantic) representational similarity matrices for PyTorch Lightning."""

from typing import Any

__version__ = "0.1.0"

from lightning_rsm.archive import ArchivedEvaluation, ArchiveWriter, load_rsms, probe_fingerprint
from lightning_rsm.run_comparison import RunComparison, compare_runs

__all__ = [
    "ArchiveWriter",
    "ArchivedEvaluation",
    "RSMMonitor",
    "RunComparison",
    "__version__",
    "compare_runs",
    "load_rsms",
    "probe_fingerprint",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `lightning_rsm.functional` does not import pytorch_lightning.
    if name == "RSMMonitor":
        from lightning_rsm.callbacks import RSMMonitor

        return RSMMonitor
    raise AttributeError(f"module 'lightning_rsm' has no attribute {name!r}")
