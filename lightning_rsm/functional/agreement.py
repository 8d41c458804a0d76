"""Probability agreement: does the RSM rank pairs as the model's output distributions do?

For output distributions ``p_i`` (softmax of the logits) the pairwise similarity is
``s_ij = 1 - JSD(p_i, p_j)``, with JSD the Jensen-Shannon *divergence* in bits (base-2 logs),
so ``s_ij`` is in ``[0, 1]`` and is 1 for identical distributions. JSD is the square of scipy's
``jensenshannon(p, q, base=2)``, which is a distance. The probability agreement is the
correlation between ``rsm[i, j]`` and ``s_ij`` over all pairs ``i < j``; higher is better.
The paper reports corr(RSM, JSD), the same Pearson number with its sign flipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_rsm.functional.checks import check_finite, check_rsm
from lightning_rsm.functional.comparison import _CORRELATIONS, _upper_triangle
from lightning_rsm.functional.options import CORRELATIONS, check_choice

# Pairwise JSD works on blocks of about this many (pair, class) entries: it bounds memory.
_BLOCK_ELEMENTS = 1 << 23

# Probabilities (``from_logits=False``) must sum to 1 within this tolerance.
_SUM_TOLERANCE = 1e-4


def _check_distributions(
    x: object,
    from_logits: object,
    name: str,
    n: int | None = None,
    context: str = "the RSM of {n} samples",
) -> None:
    """Raise if ``x`` is not ``(N, K)`` finite logits, or probabilities if not ``from_logits``.

    With ``n`` the rows must number ``n``; ``context`` (formatted with ``n``) says what they
    are in messages.
    """
    if not isinstance(from_logits, bool):
        raise TypeError(
            f"Expected `from_logits` to be a bool, but got {type(from_logits).__name__}."
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    expected = "(N, K)" if n is None else f"({n}, K) to match {context.format(n=n)}"
    if x.ndim != 2 or x.shape[1] == 0 or (n is not None and x.shape[0] != n):
        raise ValueError(f"Expected `{name}` of shape {expected}, but got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise TypeError(f"Expected `{name}` to have a floating dtype, but got {x.dtype}.")
    check_finite(x, name)
    if from_logits:
        return
    if (x < 0).any():
        raise ValueError(
            f"Expected probabilities `{name}` (from_logits=False) to be non-negative, "
            f"but got the value {x.min().item():.6g}."
        )
    sums = x.double().sum(1)
    worst = int((sums - 1).abs().argmax())
    if abs(sums[worst].item() - 1) > _SUM_TOLERANCE:
        raise ValueError(
            f"Expected probabilities `{name}` (from_logits=False) to sum to 1 along dim 1, "
            f"but got {sums[worst].item():.6g} for row {worst}."
        )


def _jensen_shannon_similarity(p: Tensor) -> Tensor:
    """``1 - JSD`` (bits) of all pairs of rows of float64 probabilities ``(N, K)``; ``(N, N)``.

    JSD(p, q) = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2; ``xlogy`` makes 0 log 0 = 0,
    so one-hot rows are safe. Only blocks on or above the diagonal are computed.
    """
    n, k = p.shape
    entropy = -torch.xlogy(p, p).sum(1) / math.log(2)
    out = torch.empty(n, n, dtype=torch.float64, device=p.device)
    block = max(1, _BLOCK_ELEMENTS // (n * k))
    for start in range(0, n, block):
        stop = min(n, start + block)
        m = (p[start:stop, None, :] + p[None, start:, :]) / 2
        mixture_entropy = -torch.xlogy(m, m).sum(2) / math.log(2)
        del m
        jsd = mixture_entropy - (entropy[start:stop, None] + entropy[None, start:]) / 2
        similarity = 1 - jsd.clamp(0, 1)
        out[start:stop, start:] = similarity
        out[start:, start:stop] = similarity.T
    out.fill_diagonal_(1)
    return out


def _probabilities(x: Tensor, from_logits: bool) -> Tensor:
    return torch.softmax(x.double(), dim=1) if from_logits else x.double()


def _probability_agreement_compute(rsm: Tensor, similarity: Tensor, correlation: str) -> Tensor:
    """Correlation of the upper triangles of ``rsm`` and an output-similarity matrix, float64."""
    return _CORRELATIONS[correlation](
        _upper_triangle(rsm.double()), _upper_triangle(similarity.double().to(rsm.device))
    )


def jensen_shannon_similarity(logits_or_probs: Tensor, from_logits: bool = True) -> Tensor:
    """Pairwise ``1 - JSD(p_i, p_j)`` of N output distributions, JSD in bits.

    Computed in float64 in blocks of rows (memory O(N^2 + block)); cost O(N^2 K).

    Args:
        logits_or_probs: logits of shape ``(N, K)``, or probabilities if ``from_logits`` is
            False (non-negative, each row summing to 1; zeros are fine).
        from_logits: apply a softmax over dim 1 first.

    Returns:
        symmetric tensor of shape ``(N, N)`` in ``[0, 1]`` with ones on the diagonal, of the
        input's floating dtype (at least float32).

    Raises:
        TypeError: If the input is not a floating tensor or ``from_logits`` is not a bool.
        ValueError: If the input is not of shape ``(N, K)``, holds NaN/Inf, or (probabilities)
            has negative entries or rows that do not sum to 1.

    Example:
        >>> import torch
        >>> p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        >>> jensen_shannon_similarity(p, from_logits=False)
        tensor([[1.0000, 0.0000, 0.6887],
                [0.0000, 1.0000, 0.6887],
                [0.6887, 0.6887, 1.0000]])
    """
    _check_distributions(logits_or_probs, from_logits, "logits_or_probs")
    dtype = torch.promote_types(logits_or_probs.dtype, torch.float32)
    return _jensen_shannon_similarity(_probabilities(logits_or_probs, from_logits)).to(dtype)


def probability_agreement(
    rsm: Tensor, logits: Tensor, *, correlation: str = "pearson", from_logits: bool = True
) -> Tensor:
    """Correlation between an RSM and the similarity of the model's output distributions.

    ``corr(rsm[i, j], 1 - JSD(p_i, p_j))`` over all ``i < j`` with ``p_i = softmax(logits_i)``
    and JSD in bits (see the module docstring). Higher is better.

    Args:
        rsm: similarity matrix of shape ``(N, N)``.
        logits: logits of shape ``(N, K)`` for the same samples, or probabilities if
            ``from_logits`` is False.
        correlation: ``"pearson"``, ``"spearman"`` or ``"kendall"`` (tau-a).
        from_logits: apply a softmax over dim 1 of ``logits`` first.

    Returns:
        scalar tensor in ``[-1, 1]``; NaN with a warning if either side is constant.

    Raises:
        TypeError: If ``rsm`` or ``logits`` is not a floating tensor, or ``from_logits`` is
            not a bool.
        ValueError: If ``correlation`` is unknown, ``rsm`` is not a finite square matrix with
            N >= 2, ``logits`` are not of shape ``(N, K)`` or hold NaN/Inf, or probabilities
            are negative or do not sum to 1.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> probability_agreement(rsm, logits, correlation="spearman")
        tensor(1.)
    """
    check_choice(correlation, CORRELATIONS, "correlation")
    check_rsm(rsm)
    _check_distributions(logits, from_logits, "logits", rsm.shape[0])
    similarity = _jensen_shannon_similarity(_probabilities(logits.to(rsm.device), from_logits))
    score = _probability_agreement_compute(rsm, similarity, correlation)
    dtype = torch.promote_types(torch.promote_types(rsm.dtype, logits.dtype), torch.float32)
    return score.to(dtype)
