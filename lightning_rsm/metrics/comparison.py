"""``RSMComparison``: how similar are the semantic RSMs of two representations of a probe set."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_rsm.functional.comparison import compare_rsms
from lightning_rsm.functional.options import COMPARISON_METHODS, DEFAULT_MAX_POSITIONS, check_choice
from lightning_rsm.metrics._base import _SemanticRSMBase


class RSMComparison(_SemanticRSMBase):
    """Similarity of the semantic RSMs of two representations of the same samples.

    ``update(a, b)`` stores a batch of two representations of the same samples, e.g. two
    layers, or one layer of two checkpoints; ``compute`` builds both semantic RSMs and returns
    :func:`~lightning_rsm.functional.compare_rsms` of them: a similarity (1 = same structure,
    higher is more alike), never a distance. States are lists reduced with ``"cat"`` (correct
    under DDP). The two representations may differ in shape after dim 0.

    .. note::
        Both representations are kept until ``reset()``: memory grows as N * S * C floats for
        each.

    Args:
        method: ``"spearman"``, ``"pearson"``, ``"kendall"`` or ``"cka"``.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``, used for both RSMs.
        matcher: ``"exact"``, ``"windowed"``, ``"greedy"`` or ``"auction"``.
        sigma: RBF bandwidth; default the median heuristic (of each RSM).
        window: window size of the ``"windowed"`` matcher.
        tol: certified cosine-scale tolerance of the ``"auction"`` matcher.
        max_positions: pool each sample to at most this many concept vectors on ``update``
            (``None``: keep all).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If an option is unknown or out of range.

    Example:
        >>> import torch
        >>> from lightning_rsm.metrics import RSMComparison
        >>> x = torch.rand(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
        >>> metric = RSMComparison(method="spearman")
        >>> metric.update(x, x.flip(2, 3))      # same content, every map rotated 180 degrees
        >>> metric.compute()
        tensor(1.)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    features_a: list[Tensor]
    features_b: list[Tensor]

    def __init__(
        self,
        method: str = "spearman",
        kernel: str = "cosine",
        matcher: str = "exact",
        *,
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            kernel=kernel,
            matcher=matcher,
            sigma=sigma,
            window=window,
            tol=tol,
            max_positions=max_positions,
            **kwargs,
        )
        check_choice(method, COMPARISON_METHODS, "method")
        self.method = method
        self.add_state("features_a", default=[], dist_reduce_fx="cat")
        self.add_state("features_b", default=[], dist_reduce_fx="cat")

    def update(self, a: Tensor, b: Tensor) -> None:
        """Store a batch of two representations of the same B samples.

        Args:
            a: representations of shape ``(B, C, H, W)``, ``(B, T, D)`` or ``(B, D)``.
            b: representations of the same B samples, any of those shapes.

        Raises:
            TypeError: If ``a`` or ``b`` is not a real tensor.
            ValueError: If ``a`` or ``b`` is not a valid representation, their batch sizes
                differ, or their shapes differ from earlier updates.
        """
        concepts_a = self._concepts(a, "a", self.features_a)
        concepts_b = self._concepts(b, "b", self.features_b)
        if concepts_a.shape[0] != concepts_b.shape[0]:
            raise ValueError(
                f"Expected `a` and `b` to hold the same number of samples, but got "
                f"{concepts_a.shape[0]} and {concepts_b.shape[0]}."
            )
        self.features_a.append(concepts_a.to(self.device))
        self.features_b.append(concepts_b.to(self.device))

    def compute(self) -> Tensor:
        """``compare_rsms`` of the semantic RSMs of all stored ``a`` and ``b``; a scalar."""
        return compare_rsms(
            self._semantic_rsm(self.features_a, "a"),
            self._semantic_rsm(self.features_b, "b"),
            method=self.method,
        )

    def plot(self, val: Tensor | list[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot one value or a series of values (e.g. per epoch) with torchmetrics' helper.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)
