"""Pure tensor -> tensor functions: representations, matching, RSMs and their quality."""

from lightning_rsm.functional.representations import to_concepts

__all__ = ["to_concepts"]
