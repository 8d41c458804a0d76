"""Retrieval quality of an RSM: each sample queries all others, ranked by similarity.

For a query ``i`` the other N - 1 samples are ranked by ``rsm[i, j]``, highest first. The
query itself is never part of its ranking. Ties are broken deterministically: a stable sort
by descending similarity, so among equal similarities the sample with the lower index comes
first. A sample ``j`` is relevant to ``i`` when they share a label: the same class id for
labels of shape ``(N,)``, at least one common label for multi-hot labels of shape ``(N, L)``.

Queries with no relevant sample among the other N - 1 have no defined average precision or
recall; ``empty_target_action`` decides what happens to them, the same for every score:

==========  ==============================================================================
``"skip"``  (default) they are left out of the mean; if every query is left out the
            score is 0 and a warning is issued
``"neg"``   they score 0 (torchmetrics' default)
``"pos"``   they score 1
``"error"`` a ValueError naming the first such query
==========  ==============================================================================

The work is vectorised over blocks of rows of the dense RSM: memory is O(N^2) for the RSM
plus O(block) for the sort, and no per-query Python loop or N^2-long index tensor is built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_rsm.functional.checks import check_rsm
from lightning_rsm.functional.options import (
    EMPTY_TARGET_ACTIONS,
    check_choice,
    check_labels,
)

# Rows are ranked in blocks of about this many RSM entries: it bounds the memory of the sort.
_BLOCK_ELEMENTS = 1 << 22


def _check_k(k: object, name: str, n: int) -> None:
    """Raise if ``k`` is not an int in ``[1, N - 1]``."""
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n - 1):
        raise ValueError(
            f"Expected `{name}` to be an int in [1, N - 1] = [1, {n - 1}] for an RSM of {n} "
            f"samples, but got {k!r}."
        )


def _check_retrieval_args(
    rsm: Tensor,
    labels: Tensor,
    ks: Sequence[tuple[str, object]],
    empty_target_action: object,
) -> None:
    """Check every argument of a retrieval score before any sorting."""
    check_choice(empty_target_action, EMPTY_TARGET_ACTIONS, "empty_target_action")
    check_rsm(rsm)
    n = rsm.shape[0]
    check_labels(labels, n)
    for name, k in ks:
        _check_k(k, name, n)


def _relevance(query_labels: Tensor, labels: Tensor) -> Tensor:
    """``(B, N)`` bool: does query ``b`` share a label with sample ``j``."""
    if labels.ndim == 1:
        return query_labels[:, None] == labels[None, :]
    return (query_labels.float() @ labels.float().T) > 0


def _retrieval_compute(
    rsm: Tensor,
    labels: Tensor,
    *,
    top_k: int | None = None,
    ks: Sequence[int] = (),
    f1: bool = False,
    empty_target_action: str = "skip",
) -> dict[str, Tensor]:
    """All retrieval scores from one ranking of each query; arguments are already checked.

    Returns:
        dict with ``"map"``, ``"precision@k"`` and ``"recall@k"`` for each k in ``ks``, and
        ``"f1@1"`` if ``f1``; each a scalar tensor.
    """
    n = rsm.shape[0]
    labels = labels.to(rsm.device)
    if labels.ndim == 2:
        labels = labels != 0
    depth = n - 1 if top_k is None else top_k
    positions = torch.arange(1, depth + 1, device=rsm.device, dtype=torch.float64)
    per_query: dict[str, list[Tensor]] = {"map": []}
    for k in ks:
        per_query[f"precision@{k}"] = []
        per_query[f"recall@{k}"] = []
    if f1:
        per_query["f1@1"] = []
    has_relevant = []

    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = torch.arange(start, stop, device=rsm.device)
        relevant = _relevance(labels[start:stop], labels)
        relevant[rows - start, rows] = False
        n_relevant = relevant.sum(1)
        if empty_target_action == "error" and not n_relevant.all():
            first = start + int((n_relevant == 0).nonzero()[0])
            raise ValueError(
                "Expected every query to have at least one relevant sample "
                f"(`empty_target_action='error'`), but query {first} shares no label with any "
                "other sample."
            )
        scores = rsm[start:stop].clone()
        scores[rows - start, rows] = -torch.inf  # the query itself goes last, then is cut off
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : n - 1]
        del scores
        ranked = relevant.gather(1, order)
        hits = ranked.cumsum(1, dtype=torch.int64)
        n_relevant = n_relevant.double()

        # AP: mean precision at the ranks of the relevant samples (within the first `depth`).
        precision_at_hits = (hits[:, :depth] / positions) * ranked[:, :depth]
        ap_denominator = n_relevant if top_k is None else hits[:, depth - 1].double()
        per_query["map"].append(precision_at_hits.sum(1) / ap_denominator.clamp(min=1))
        for k in ks:
            hits_k = hits[:, k - 1].double()
            per_query[f"precision@{k}"].append(hits_k / k)
            per_query[f"recall@{k}"].append(hits_k / n_relevant.clamp(min=1))
        if f1:
            query, top1 = labels[start:stop], labels[order[:, 0]]
            if labels.ndim == 1:
                per_query["f1@1"].append((query == top1).double())
            else:
                overlap = (query & top1).sum(1).double()
                sizes = (query.sum(1) + top1.sum(1)).double()
                per_query["f1@1"].append(2 * overlap / sizes.clamp(min=1))
        has_relevant.append(n_relevant > 0)

    valid = torch.cat(has_relevant)
    dtype = torch.promote_types(rsm.dtype, torch.float32)
    if empty_target_action == "skip" and not valid.any():
        warnings.warn(
            "No query has a relevant sample (no two samples share a label); retrieval scores "
            "are set to 0.",
            UserWarning,
            stacklevel=3,
        )
    out = {}
    for key, values in per_query.items():
        value = torch.cat(values)
        if empty_target_action == "skip":
            value = value[valid].mean() if valid.any() else value.new_zeros(())
        else:
            value = torch.where(valid, value, float(empty_target_action == "pos")).mean()
        out[key] = value.to(dtype)
    return out


def retrieval_average_precision(
    rsm: Tensor,
    labels: Tensor,
    top_k: int | None = None,
    *,
    empty_target_action: str = "skip",
) -> Tensor:
    """Mean average precision (mAP) of retrieving same-label samples with an RSM.

    Each sample ``i`` queries the other N - 1, ranked by ``rsm[i, j]`` (highest first, ties
    by lower index). Its average precision is the mean of precision@r over the ranks r of its
    relevant samples; the score is the mean over queries (see the module docstring for ties
    and queries without relevant samples). With ``top_k`` only the first ``top_k`` ranks count
    and the mean is over the relevant samples found there (0 if none), as in torchmetrics.

    Args:
        rsm: similarity matrix of shape ``(N, N)``, higher is more similar.
        labels: class ids of shape ``(N,)`` or multi-hot labels of shape ``(N, L)``.
        top_k: ``None`` for the whole ranking, or an int in ``[1, N - 1]``.
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"``.

    Returns:
        scalar tensor in ``[0, 1]``, higher is better.

    Raises:
        TypeError: If ``rsm`` is not a floating tensor or ``labels`` are not a tensor of
            integer/bool class ids or multi-hot values.
        ValueError: If ``rsm`` is not a finite square matrix with N >= 2, ``labels`` do not
            have N rows or multi-hot labels hold values other than 0 and 1, ``top_k`` is not
            in ``[1, N - 1]``, ``empty_target_action`` is unknown, or it is ``"error"`` and
            a query has no relevant sample.

    Example:
        >>> import torch
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1, 0.2],
        ...                     [0.9, 1.0, 0.3, 0.1],
        ...                     [0.1, 0.3, 1.0, 0.2],
        ...                     [0.2, 0.1, 0.2, 1.0]])
        >>> retrieval_average_precision(rsm, torch.tensor([0, 0, 1, 1]))
        tensor(0.7500)
    """
    ks = [] if top_k is None else [("top_k", top_k)]
    _check_retrieval_args(rsm, labels, ks, empty_target_action)
    return _retrieval_compute(rsm, labels, top_k=top_k, empty_target_action=empty_target_action)[
        "map"
    ]


def retrieval_precision(
    rsm: Tensor, labels: Tensor, k: int = 1, *, empty_target_action: str = "skip"
) -> Tensor:
    """Mean precision@k: the fraction of relevant samples among each query's first k.

    Ranking, ties and queries without relevant samples are as in
    :func:`retrieval_average_precision`.

    Args:
        rsm: similarity matrix of shape ``(N, N)``, higher is more similar.
        labels: class ids of shape ``(N,)`` or multi-hot labels of shape ``(N, L)``.
        k: an int in ``[1, N - 1]``.
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"``.

    Returns:
        scalar tensor in ``[0, 1]``, higher is better.

    Raises:
        TypeError: As :func:`retrieval_average_precision`.
        ValueError: As :func:`retrieval_average_precision`, or ``k`` is not in ``[1, N - 1]``.

    Example:
        >>> import torch
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1, 0.2],
        ...                     [0.9, 1.0, 0.3, 0.1],
        ...                     [0.1, 0.3, 1.0, 0.2],
        ...                     [0.2, 0.1, 0.2, 1.0]])
        >>> retrieval_precision(rsm, torch.tensor([0, 0, 1, 1]), k=1)
        tensor(0.5000)
    """
    _check_retrieval_args(rsm, labels, [("k", k)], empty_target_action)
    return _retrieval_compute(rsm, labels, ks=(k,), empty_target_action=empty_target_action)[
        f"precision@{k}"
    ]


def retrieval_recall(
    rsm: Tensor, labels: Tensor, k: int, *, empty_target_action: str = "skip"
) -> Tensor:
    """Mean recall@k: the fraction of each query's relevant samples found in its first k.

    Ranking, ties and queries without relevant samples are as in
    :func:`retrieval_average_precision`.

    Args:
        rsm: similarity matrix of shape ``(N, N)``, higher is more similar.
        labels: class ids of shape ``(N,)`` or multi-hot labels of shape ``(N, L)``.
        k: an int in ``[1, N - 1]``.
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"``.

    Returns:
        scalar tensor in ``[0, 1]``, higher is better.

    Raises:
        TypeError: As :func:`retrieval_average_precision`.
        ValueError: As :func:`retrieval_average_precision`, or ``k`` is not in ``[1, N - 1]``.

    Example:
        >>> import torch
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1, 0.2],
        ...                     [0.9, 1.0, 0.3, 0.1],
        ...                     [0.1, 0.3, 1.0, 0.2],
        ...                     [0.2, 0.1, 0.2, 1.0]])
        >>> retrieval_recall(rsm, torch.tensor([0, 0, 1, 1]), k=2)
        tensor(1.)
    """
    _check_retrieval_args(rsm, labels, [("k", k)], empty_target_action)
    return _retrieval_compute(rsm, labels, ks=(k,), empty_target_action=empty_target_action)[
        f"recall@{k}"
    ]


def retrieval_f1_at_1(rsm: Tensor, labels: Tensor, *, empty_target_action: str = "skip") -> Tensor:
    """Mean F1@1 for multi-label probes: label-set overlap of each query and its top-1 match.

    For query ``i`` with label set A and its most similar other sample with label set B the
    score is ``2 |A & B| / (|A| + |B|)`` (the F1 of B as a prediction of A), averaged over
    queries. For class ids of shape ``(N,)`` this equals precision@1. Ranking, ties and
    queries without relevant samples are as in :func:`retrieval_average_precision`.

    Args:
        rsm: similarity matrix of shape ``(N, N)``, higher is more similar.
        labels: multi-hot labels of shape ``(N, L)`` (or class ids of shape ``(N,)``).
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"``.

    Returns:
        scalar tensor in ``[0, 1]``, higher is better.

    Raises:
        TypeError: As :func:`retrieval_average_precision`.
        ValueError: As :func:`retrieval_average_precision`.

    Example:
        >>> import torch
        >>> rsm = torch.tensor([[1.0, 0.9, 0.1],
        ...                     [0.9, 1.0, 0.3],
        ...                     [0.1, 0.3, 1.0]])
        >>> labels = torch.tensor([[1, 1, 0],    # query 0 retrieves 1: 2 * 1 / (2 + 1)
        ...                        [0, 1, 0],    # query 1 retrieves 0: 2 * 1 / (1 + 2)
        ...                        [0, 1, 1]])   # query 2 retrieves 1: 2 * 1 / (2 + 1)
        >>> retrieval_f1_at_1(rsm, labels)
        tensor(0.6667)
    """
    _check_retrieval_args(rsm, labels, [], empty_target_action)
    return _retrieval_compute(rsm, labels, f1=True, empty_target_action=empty_target_action)["f1@1"]
