"""Permutation-invariant (semantic) representational similarity matrices for PyTorch Lightning."""

from lightning_rsm.callbacks import RSMMonitor

__version__ = "0.1.0"

__all__ = ["RSMMonitor", "__version__"]
