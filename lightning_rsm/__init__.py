"""Permutation-invariant (semantic) representational similarity matrices for PyTorch Lightning."""

__version__ = "0.1.0"
