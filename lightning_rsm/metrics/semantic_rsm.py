"""``SemanticRSM``: accumulate a layer's representations, compute the RSM and its quality."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE, _error_on_missing_matplotlib

from lightning_rsm.functional.agreement import _check_distributions
from lightning_rsm.functional.options import (
    CORRELATIONS,
    DEFAULT_MAX_POSITIONS,
    EMPTY_TARGET_ACTIONS,
    check_choice,
    check_labels,
    check_positive_int,
    is_positive_int,
)
from lightning_rsm.functional.scores import rsm_scores
from lightning_rsm.metrics._base import _SemanticRSMBase
from lightning_rsm.plotting import draw_rsm


class SemanticRSM(_SemanticRSMBase):
    """Semantic RSM of representations gathered batch by batch, with its quality scores.

    ``update`` stores each batch's representations (and optionally labels, logits and sample
    ids); ``compute`` builds the semantic RSM of all samples with
    :func:`~lightning_rsm.functional.semantic_rsm` and returns its scores from
    :func:`~lightning_rsm.functional.rsm_scores`, a dict of scalars that ``log_dict`` takes:
    ``"map"``, ``"precision@k"``, ``"recall@k"`` with labels, ``"f1@1"`` with multi-hot labels,
    ``"probability_agreement"`` with logits (empty without labels and logits). ``rsm()``
    returns the ``(N, N)`` RSM of the same computation (computed once for both).

    All scores are higher-is-better. States are lists reduced with ``"cat"``, so under DDP
    ``compute`` sees every rank's samples (rank 0's first) and returns the same on all ranks,
    sharing the RSM's work among them; a rank that stored nothing takes part too. The RSM's
    row order is the order samples were gathered in, or ascending ``ids`` when ids are given.

    In a ``LightningModule``, update in ``validation_step`` and log at the epoch's end (the
    dict is not a scalar, so ``self.log("name", metric)`` cannot take this Metric; it can take
    :class:`ProbabilityAgreement` and :class:`RSMComparison`). Every rank holds the same
    scores; ``sync_dist=True`` is what Lightning asks for them under DDP::

        def validation_step(self, batch, batch_idx):
            x, y, ids = batch  # a Dataset that also returns each sample's index
            features = self.backbone(x)
            self.rsm_metric.update(features, labels=y, logits=self.head(features), ids=ids)

        def on_validation_epoch_end(self):
            scores = self.rsm_metric.compute()
            self.log_dict({f"val/rsm/{k}": v for k, v in scores.items()}, sync_dist=True)
            self.rsm_metric.reset()

    .. note::
        Under DDP, Lightning's ``DistributedSampler`` pads the last batches by repeating
        samples so every rank gets as many: 241 validation samples on 2 ranks are computed
        as 242. Pass each sample's index (``ids``, e.g. from a Dataset that returns it): after
        the gather the repeats are dropped, keeping each id's first occurrence, and the rows
        follow ascending ids, the same on any number of ranks. Without ``ids`` the repeats
        stay.

    .. note::
        Representations are kept until ``reset()``: memory grows as N * S * C floats (after
        pooling to ``max_positions``), and the exact matcher's cost grows as N^2 S^3. Use it
        on a fixed probe set. Call ``update`` per batch; ``forward`` also builds the batch's
        own RSM, which costs a matching per batch.

    Args:
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: ``"exact"``, ``"windowed"``, ``"greedy"`` or ``"auction"`` (see ``semantic_rsm``).
        sigma: RBF bandwidth; default the median heuristic.
        window: window size of the ``"windowed"`` matcher.
        tol: certified cosine-scale tolerance of the ``"auction"`` matcher.
        max_positions: pool each sample to at most this many concept vectors on ``update``
            (``None``: keep all).
        top_k: rank depth for ``"map"``; ``None`` for the whole ranking.
        ks: the k of ``"precision@k"`` and ``"recall@k"``.
        correlation: ``"pearson"``, ``"spearman"`` or ``"kendall"`` for the agreement.
        from_logits: whether ``logits`` are logits (softmax applied) or probabilities.
        empty_target_action: ``"skip"``, ``"neg"``, ``"pos"`` or ``"error"`` for queries with
            no relevant sample (see :mod:`lightning_rsm.functional.retrieval`).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: If an option is unknown or out of range.
        TypeError: If ``from_logits`` is not a bool.

    Example:
        >>> import torch
        >>> from lightning_rsm.metrics import SemanticRSM
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.rand(2, 1, 8, 4, 4, generator=g)    # two patterns of (1, C, H, W)
        >>> metric = SemanticRSM()
        >>> metric.update(torch.cat([a, a.roll(1, 3)]), labels=torch.tensor([0, 0]))
        >>> metric.update(torch.cat([b, b.roll(2, 2)]), labels=torch.tensor([1, 1]))
        >>> metric.compute()                                 # shifted copies find each other
        {'map': tensor(1.), 'precision@1': tensor(1.), 'recall@1': tensor(1.)}
        >>> metric.rsm().shape
        torch.Size([4, 4])
    """

    higher_is_better = True

    features: list[Tensor]
    labels: list[Tensor]
    logits: list[Tensor]
    ids: list[Tensor]

    def __init__(
        self,
        kernel: str = "cosine",
        matcher: str = "exact",
        *,
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        top_k: int | None = None,
        ks: Sequence[int] = (1,),
        correlation: str = "pearson",
        from_logits: bool = True,
        empty_target_action: str = "skip",
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
        check_positive_int(top_k, "top_k", optional=True)
        if not (isinstance(ks, Sequence) and len(ks) > 0 and all(map(is_positive_int, ks))):
            raise ValueError(
                f"Expected `ks` to be a non-empty sequence of positive ints, but got {ks!r}."
            )
        check_choice(correlation, CORRELATIONS, "correlation")
        if not isinstance(from_logits, bool):
            raise TypeError(
                f"Expected `from_logits` to be a bool, but got {type(from_logits).__name__}."
            )
        check_choice(empty_target_action, EMPTY_TARGET_ACTIONS, "empty_target_action")
        self.top_k = top_k
        self.ks = tuple(ks)
        self.correlation = correlation
        self.from_logits = from_logits
        self.empty_target_action = empty_target_action
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self._rsm: Tensor | None = None  # the RSM of the last compute, returned by rsm()

    def _check_presence(self, name: str, value: Tensor | None) -> None:
        """Labels and logits must come with every update or with none."""
        earlier = bool(len(getattr(self, name)))
        if len(self.features) and (value is not None) != earlier:
            raise ValueError(
                f"Expected `{name}` in every update or in none, but update "
                f"{len(self.features) + 1} is {'with' if value is not None else 'without'} "
                f"`{name}` and the earlier ones were {'with' if earlier else 'without'}."
            )

    def update(
        self,
        features: Tensor,
        labels: Tensor | None = None,
        logits: Tensor | None = None,
        ids: Tensor | None = None,
    ) -> None:
        """Store a batch.

        Args:
            features: representations of shape ``(B, C, H, W)``, ``(B, T, D)`` or ``(B, D)``.
            labels: class ids of shape ``(B,)`` or multi-hot labels of shape ``(B, L)``.
            logits: logits (or probabilities if not ``from_logits``) of shape ``(B, K)``.
            ids: integer sample ids of shape ``(B,)`` (e.g. dataset indices); samples whose id
                was stored before (by any rank) are dropped in ``compute``.

        Raises:
            TypeError: As ``semantic_rsm``, ``retrieval_average_precision`` and
                ``probability_agreement`` for their inputs, or if ``ids`` are not integers.
            ValueError: If shapes differ from the batch size or earlier updates, values are
                invalid, or labels/logits/ids are given in some updates but not others.
        """
        concepts = self._concepts(features, "features", self.features)
        n = concepts.shape[0]
        context = "the {n} samples of `features`"
        self._check_presence("labels", labels)
        self._check_presence("logits", logits)
        self._check_presence("ids", ids)
        if ids is not None:
            _check_ids(ids, n)
            self.ids.append(ids.detach().to(self.device, torch.long))
        if labels is not None:
            check_labels(labels, n, context)
            earlier = self.labels[0].shape[1:] if len(self.labels) else labels.shape[1:]
            if labels.shape[1:] != earlier:
                expected = f"(B, {earlier[0]})" if earlier else "(B,)"
                raise ValueError(
                    f"Expected `labels` of shape {expected} like the earlier updates, "
                    f"but got shape {tuple(labels.shape)}."
                )
            self.labels.append(labels.detach().to(self.device, torch.long))
        if logits is not None:
            _check_distributions(logits, self.from_logits, "logits", n, context)
            if len(self.logits) and logits.shape[1] != self.logits[0].shape[1]:
                raise ValueError(
                    f"Expected `logits` of shape (B, {self.logits[0].shape[1]}) like the "
                    f"earlier updates, but got shape {tuple(logits.shape)}."
                )
            self.logits.append(logits.detach().to(self.device))
        self.features.append(concepts.to(self.device))

    def compute(self) -> dict[str, Tensor]:
        """The scores of the semantic RSM of all stored samples (see the class docstring).

        Raises:
            ValueError: If nothing was stored, fewer than 2 samples were, ``top_k`` or a k in
                ``ks`` exceeds N - 1, or ``empty_target_action="error"`` meets a query with
                no relevant sample.
        """
        stored = {name: getattr(self, name) for name in ("features", "labels", "logits")}
        if len(self.ids):
            keep = _first_of_each_id(dim_zero_cat(self.ids))
            stored = {name: dim_zero_cat(v)[keep] if len(v) else v for name, v in stored.items()}
        self._rsm = self._semantic_rsm(stored["features"], "features")
        return rsm_scores(
            self._rsm,
            dim_zero_cat(stored["labels"]) if len(stored["labels"]) else None,
            dim_zero_cat(stored["logits"]) if len(stored["logits"]) else None,
            ks=self.ks,
            top_k=self.top_k,
            correlation=self.correlation,
            from_logits=self.from_logits,
            empty_target_action=self.empty_target_action,
        )

    def rsm(self) -> Tensor:
        """The ``(N, N)`` semantic RSM behind ``compute()``'s scores (computed once for both).

        Raises:
            ValueError: As ``compute``.
        """
        self.compute()
        return self._rsm.clone()

    def plot(
        self, val: dict[str, Tensor] | Tensor | None = None, ax: _AX_TYPE | None = None
    ) -> _PLOT_OUT_TYPE:
        """Draw the RSM with :func:`~lightning_rsm.plotting.draw_rsm`: samples sorted by label
        (when labels were stored), class boundaries and ticks, a colour scale from the data
        (off-diagonal 1st-99th percentiles) and a colour bar.

        Args:
            val: a result of ``compute()`` (then the RSM is ``rsm()``) or an RSM; default: call
                ``compute()``.
            ax: a matplotlib axis to draw into; default a new figure.

        Returns:
            ``(figure, axis)``.

        Raises:
            ModuleNotFoundError: If matplotlib is not installed.
        """
        _error_on_missing_matplotlib()
        from matplotlib.figure import Figure

        val = self.compute() if val is None else val
        rsm = self.rsm() if isinstance(val, dict) else val
        labels = dim_zero_cat(self.labels).cpu() if len(self.labels) else None
        if labels is not None and labels.shape[0] != rsm.shape[0]:
            labels = None  # an RSM of other samples than the stored ones: probe order
        if ax is None:
            ax = Figure(figsize=(5.0, 4.4), dpi=100, layout="constrained").subplots()
        title = f"semantic RSM ({self.kernel}, {self.matcher})"
        if isinstance(val, dict) and "map" in val:
            title += f", mAP {float(val['map']):.3f}"
        draw_rsm(ax, rsm, labels, title=title, colour_bar=f"{self.kernel} similarity")
        fig = ax.get_figure()
        return fig, ax


def _check_ids(ids: object, n: int) -> None:
    """Raise unless ``ids`` are ``n`` integer sample ids of shape ``(n,)``."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"Expected `ids` to be a torch.Tensor, but got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"Expected `ids` to have an integer dtype, but got {ids.dtype}.")
    if ids.shape != (n,):
        raise ValueError(
            f"Expected `ids` of shape ({n},) to match the {n} samples of `features`, but got "
            f"shape {tuple(ids.shape)}."
        )


def _first_of_each_id(ids: Tensor) -> Tensor:
    """Indices of each id's first occurrence in ``ids``, in ascending order of id.

    Example:
        >>> _first_of_each_id(torch.tensor([4, 0, 2, 0, 4]))
        tensor([1, 2, 0])
    """
    order = torch.argsort(ids, stable=True)
    ranked = ids[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    return order[first]
