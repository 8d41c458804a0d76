"""Every quality score of one RSM from one call: the single scoring path of the package.

:func:`rsm_scores` is what the ``SemanticRSM`` metric, the ``RSMMonitor`` callback and the
``lightning-rsm compute`` command report, under the same names:

===========================  ============================================  ====================
key                          score                                         needs
===========================  ============================================  ====================
``"map"``                    retrieval mean average precision              labels
``"precision@k"``            retrieval precision at k, for each k in ks    labels
``"recall@k"``               retrieval recall at k, for each k in ks       labels
``"f1@1"``                   the paper's F1@1                              multi-hot labels
``"probability_agreement"``  correlation with ``1 - JSD`` of the outputs   logits (or their
                                                                           similarity matrix)
===========================  ============================================  ====================

Each query's row is ranked once for all retrieval scores; ranking, ties and queries without
relevant samples follow :mod:`lightning_rsm.functional.retrieval`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_rsm.functional.agreement import (
    _check_distributions,
    _jensen_shannon_similarity,
    _probabilities,
    _probability_agreement_compute,
)
from lightning_rsm.functional.checks import check_rsm
from lightning_rsm.functional.options import (
    CORRELATIONS,
    EMPTY_TARGET_ACTIONS,
    check_choice,
    check_labels,
)
from lightning_rsm.functional.retrieval import _check_k, _retrieval_compute


def rsm_scores(
    rsm: Tensor,
    labels: Tensor | None = None,
    logits: Tensor | None = None,
    *,
    output_similarity: Tensor | None = None,
    ks: Sequence[int] = (1,),
    top_k: int | None = None,
    correlation: str = "pearson",
    from_logits: bool = True,
    empty_target_action: str = "skip",
) -> dict[str, Tensor]:
    """All quality scores of an RSM (see the module docstring for the keys).

    Args:
        rsm: similarity matrix of shape ``(N, N)``, higher is more similar.
        labels: class ids ``(N,)`` or multi-hot labels ``(N, L)``; enables the retrieval
            scores (and ``"f1@1"`` for multi-hot labels).
        logits: the model's outputs ``(N, K)`` (probabilities if not ``from_logits``);
            enables ``"probability_agreement"``.
        output_similarity: instead of ``logits``, their ``(N, N)`` matrix of ``1 - JSD``
            (:func:`~lightning_rsm.functional.jensen_shannon_similarity`), to form it once
            for many RSMs of the same samples.
        ks: the k of ``"precision@k"`` and ``"recall@k"``, each in ``[1, N - 1]``.
        top_k: rank depth of ``"map"``; ``None`` for the whole ranking.
        correlation: ``"pearson"``, ``"spearman"`` or ``"kendall"`` for the agreement.
        from_logits: whether ``logits`` are logits (softmax applied) or probabilities.
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"``.

    Returns:
        dict of scalar tensors, every score higher-is-better; empty without labels and logits.

    Raises:
        TypeError: If a tensor has the wrong type or dtype (e.g. float class ids).
        ValueError: If an option is unknown or out of range, shapes do not match ``rsm``,
            values are NaN/Inf, or both ``logits`` and ``output_similarity`` are given.

    Example:
        >>> import torch
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1, 0.2],
        ...                     [0.9, 1.0, 0.3, 0.1],
        ...                     [0.1, 0.3, 1.0, 0.2],
        ...                     [0.2, 0.1, 0.2, 1.0]])
        >>> logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
        >>> scores = rsm_scores(rsm, torch.tensor([0, 0, 1, 1]), logits)
        >>> {key: round(float(value), 4) for key, value in scores.items()}
        {'map': 0.75, 'precision@1': 0.5, 'recall@1': 0.5, 'probability_agreement': 0.6358}
    """
    check_rsm(rsm)
    n = rsm.shape[0]
    check_choice(correlation, CORRELATIONS, "correlation")
    check_choice(empty_target_action, EMPTY_TARGET_ACTIONS, "empty_target_action")
    if not (isinstance(ks, Sequence) and not isinstance(ks, str)):
        raise TypeError(f"Expected `ks` to be a sequence of ints, but got {type(ks).__name__}.")
    if labels is not None:
        check_labels(labels, n)
        for k in ks:
            _check_k(k, "k", n)
        if top_k is not None:
            _check_k(top_k, "top_k", n)
    if logits is not None and output_similarity is not None:
        raise ValueError("Expected either `logits` or `output_similarity`, but got both; pass one.")
    if logits is not None:
        _check_distributions(logits, from_logits, "logits", n)
        output_similarity = _jensen_shannon_similarity(
            _probabilities(logits.to(rsm.device), from_logits)
        )
    elif output_similarity is not None:
        check_rsm(output_similarity, "output_similarity")
        if output_similarity.shape != rsm.shape:
            raise ValueError(
                f"Expected `output_similarity` of shape {tuple(rsm.shape)} like `rsm`, but got "
                f"shape {tuple(output_similarity.shape)}."
            )

    scores: dict[str, Tensor] = {}
    if labels is not None:
        scores.update(
            _retrieval_compute(
                rsm,
                labels,
                top_k=top_k,
                ks=tuple(ks),
                f1=labels.ndim == 2,
                empty_target_action=empty_target_action,
            )
        )
    if output_similarity is not None:
        dtype = torch.promote_types(rsm.dtype, torch.float32)
        scores["probability_agreement"] = _probability_agreement_compute(
            rsm, output_similarity, correlation
        ).to(dtype)
    return scores
