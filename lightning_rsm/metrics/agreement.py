"""``ProbabilityAgreement``: does a layer's semantic RSM agree with the model's outputs."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from lightning_rsm.functional.agreement import _check_distributions, probability_agreement
from lightning_rsm.functional.options import CORRELATIONS, DEFAULT_MAX_POSITIONS, check_choice
from lightning_rsm.metrics._base import _SemanticRSMBase


class ProbabilityAgreement(_SemanticRSMBase):
    """Correlation of a semantic RSM with ``1 - JSD`` of the output distributions.

    ``update(features, logits)`` stores a batch; ``compute`` builds the semantic RSM of all
    samples and returns :func:`~lightning_rsm.functional.probability_agreement` (higher is
    better, in ``[-1, 1]``). States are lists reduced with ``"cat"`` (correct under DDP).
    :class:`SemanticRSM` reports the same number under ``"probability_agreement"`` when given
    logits; this metric returns a scalar, which loggers and ``plot`` take directly.

    .. note::
        Representations are kept until ``reset()``: memory grows as N * (S * C + K) floats.

    Args:
        correlation: ``"pearson"``, ``"spearman"`` or ``"kendall"``.
        from_logits: whether ``logits`` are logits (softmax applied) or probabilities.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: ``"exact"``, ``"windowed"``, ``"greedy"`` or ``"auction"``.
        sigma: RBF bandwidth; default the median heuristic.
        window: window size of the ``"windowed"`` matcher.
        tol: certified cosine-scale tolerance of the ``"auction"`` matcher.
        max_positions: pool each sample to at most this many concept vectors on ``update``
            (``None``: keep all).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If an option is unknown or out of range.
        TypeError: If ``from_logits`` is not a bool.

    Example:
        >>> import torch
        >>> from lightning_rsm.metrics import ProbabilityAgreement
        >>> logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 2.0]])
        >>> metric = ProbabilityAgreement(correlation="spearman")
        >>> metric.update(logits, logits)    # cosine RSM of the logits themselves
        >>> metric.compute()
        tensor(0.8281)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    features: list[Tensor]
    logits: list[Tensor]

    def __init__(
        self,
        correlation: str = "pearson",
        from_logits: bool = True,
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
        check_choice(correlation, CORRELATIONS, "correlation")
        if not isinstance(from_logits, bool):
            raise TypeError(
                f"Expected `from_logits` to be a bool, but got {type(from_logits).__name__}."
            )
        self.correlation = correlation
        self.from_logits = from_logits
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, logits: Tensor) -> None:
        """Store a batch.

        Args:
            features: representations of shape ``(B, C, H, W)``, ``(B, T, D)`` or ``(B, D)``.
            logits: logits (or probabilities if not ``from_logits``) of shape ``(B, K)``.

        Raises:
            TypeError: If ``features`` or ``logits`` is not a real/floating tensor.
            ValueError: If shapes differ from the batch size or earlier updates, or values are
                NaN/Inf (or invalid probabilities).
        """
        concepts = self._concepts(features, "features", self.features)
        n = concepts.shape[0]
        _check_distributions(logits, self.from_logits, "logits", n, "the {n} samples of `features`")
        if len(self.logits) and logits.shape[1] != self.logits[0].shape[1]:
            raise ValueError(
                f"Expected `logits` of shape (B, {self.logits[0].shape[1]}) like the earlier "
                f"updates, but got shape {tuple(logits.shape)}."
            )
        self.features.append(concepts.to(self.device))
        self.logits.append(logits.detach().to(self.device))

    def compute(self) -> Tensor:
        """``probability_agreement`` of the semantic RSM of all stored samples; a scalar."""
        return probability_agreement(
            self._semantic_rsm(self.features, "features"),
            dim_zero_cat(self.logits),
            correlation=self.correlation,
            from_logits=self.from_logits,
        )

    def plot(self, val: Tensor | list[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot one value or a series of values (e.g. per epoch) with torchmetrics' helper.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)
