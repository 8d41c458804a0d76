"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_rsm.callbacks import validation
from lightning_rsm.callbacks.probe import (
    ForwardFn,
    Picker,
    Probe,
    batch_length,
    capture_layers,
    read_probe,
    slice_batch,
    untouched,
)
from lightning_rsm.callbacks.probe_selection import select_probe, validation_loader
from lightning_rsm.callbacks.ranks import run_on_every_rank
from lightning_rsm.callbacks.schedule import Schedule, check_score_readers
from lightning_rsm.functional import (
    compare_rsms,
    jensen_shannon_similarity,
    rsa_matrix,
    rsm_scores,
    semantic_rsm,
    spatio_semantic_rsm,
)
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS
from lightning_rsm.functional.representations import TokenGrid
from lightning_rsm.image_logging import log_images
from lightning_rsm.namespaces import CALLBACK_BASES, WarningCache, is_fitting, rank_zero_warn
from lightning_rsm.plotting import default_colour_range, rsm_images

if TYPE_CHECKING:  # annotations only: the class serves lightning.pytorch too
    import pytorch_lightning as pl

Rsms = dict[str, dict[str, Tensor]]  # layer -> kind ("semantic", "baseline") -> (N, N)


class RSMMonitor(*CALLBACK_BASES):
    r"""Monitor semantic RSMs of chosen layers on a fixed probe set during training.

    On each evaluation (every ``every_n_epochs`` epochs: after the epoch's validation, or after
    the training epoch when no validation ran in it; or every ``every_n_train_steps`` optimizer
    steps, right after the step; never during the sanity check) the probe is run through the
    model in eval mode, without gradients, eagerly (also a ``torch.compile``'d model: nothing is
    compiled or recompiled for it) and with every RNG state restored, the outputs of ``layers``
    are captured with forward hooks, and per layer the semantic RSM
    (and the spatially aligned baseline) is computed and scored with
    :func:`~lightning_rsm.functional.rsm_scores`. Scalars go through ``pl_module.log``, so
    ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them (at fit start, one that would
    read an ``rsm/`` key at other times than it is logged is an error naming the setting that
    fixes it); with ``every_n_train_steps`` they also go straight to the loggers at
    ``trainer.global_step``, whatever ``log_every_n_steps`` is. TensorBoard loggers also get
    the heatmaps (samples sorted by label, a colour scale fixed for the run) and the layer x
    layer RSA matrix, written by rank 0. Under DDP the ranks share the RSMs' work; if any rank
    fails in an evaluation, every rank skips it with the same warning and training goes on.

    Logged scalars (``<layer>`` as in ``model.named_modules()``, ``<kind>`` is ``semantic`` or,
    with ``baseline=True``, ``baseline``; ``<score>`` a key of ``rsm_scores``: ``map``,
    ``precision@1``, ``recall@1`` with labels, ``f1@1`` with multi-hot labels,
    ``probability_agreement`` with logits):

    ===================================  =========================================================
    ``rsm/<layer>/<kind>/<score>``       the RSM's quality score
    ``rsm/<layer>/rsa_to_previous``      RSA of the semantic RSM with the previous evaluation's
                                         (1 = unchanged); from the second evaluation on
    ``rsm/<layer>/vs_<name>``            RSA of the semantic RSM with the target RSM ``<name>``
    ``rsm/time_s``                       seconds the evaluation took
    ===================================  =========================================================

    Images: ``rsm/<layer>/<kind>/heatmap`` and ``rsm/layer_rsa`` (layers in the order given).

    Args:
        probe: the probe set, fixed for the run: a ``DataLoader`` or ``Dataset`` yielding tensors,
            ``(inputs, labels)`` tuples or (with ``input_fn``) any batch, or the whole probe as
            one such batch; read once, at fit start. Class ids ``(N,)`` (integer) or multi-hot
            labels ``(N, L)`` enable the retrieval scores. None: ``probe_size`` samples of the
            fit's validation data (its first val loader, else ``datamodule.val_dataloader()``),
            class-balanced, chosen with a fixed seed (see
            :func:`~lightning_rsm.callbacks.probe_selection.select_probe`), read once when
            training starts; the same in every run and after a resume.
        layers: module names as in ``model.named_modules()`` (inside a ``torch.compile``'d
            module also without ``_orig_mod.``); outputs of shape ``(N, C, H, W)``,
            ``(N, T, D)`` or ``(N, D)`` (tuple outputs: their first tensor).
        every_n_epochs: evaluate after every n-th epoch (the default, 1, unless
            ``every_n_train_steps`` is given).
        every_n_train_steps: evaluate after every n-th optimizer step instead (mid-epoch), in
            ``on_train_batch_end``; not together with ``every_n_epochs``.
        probe_size: samples taken from the validation data when ``probe`` is None.
        input_fn: what the model is fed from a probe batch: a key (dict batches), an index
            (tuple batches) or a function of the batch, giving a tensor ``(B, ...)`` or a
            dict/tuple of such tensors. Default: the batch, or the first of one or two tensors.
        label_fn: the labels of a probe batch, picked the same way. Default: the second tensor
            of an ``(inputs, labels)`` pair, else none.
        forward_fn: ``forward_fn(model, inputs)`` runs the model on a probe batch's inputs;
            default ``model(**inputs)`` for a dict, else ``model(inputs)``.
        special_tokens: for token layers ``(N, T, D)``: how many leading tokens are special
            (CLS, registers); pooling never mixes them with the patch tokens.
        tokens: for token layers: keep ``"all"`` tokens, only the ``"patches"`` or only the
            ``"special"`` ones.
        token_grid: for token layers with more patch tokens than ``max_positions``: ``"auto"``
            pools them as a square grid when their number is a square (a ViT's 14 x 14),
            ``(h, w)`` as that grid, ``None`` along T. Pooled token layers are named in a
            warning, once.
        kernel: ``"cosine"``, ``"inner"`` or ``"rbf"``.
        matcher: LAP solver, as in :func:`~lightning_rsm.functional.semantic_rsm`.
        sigma: RBF bandwidth; default the median heuristic of each evaluation.
        window: window size of ``matcher="windowed"``.
        tol: certified cosine-scale tolerance of ``matcher="auction"``.
        baseline: also compute the spatially aligned baseline RSM and its scores.
        max_positions: cap on the positions (``H * W`` or ``T``) per sample; larger maps are
            average-pooled first (see :mod:`lightning_rsm.functional.options`; special tokens
            kept with ``tokens="all"`` come on top). ``None`` keeps every position (exact for
            the layer, slow for large maps).
        batch_size: probe samples per forward pass.
        logits_fn: maps the model's forward output on a probe batch to logits ``(B, K)``; by
            default the output (its first tensor) when it has that shape, else the probability
            agreement is skipped with one warning.
        targets: reference RSMs ``(N, N)`` over the same probe, by name.
        method: how RSMs are compared (drift, layer x layer, targets): ``"cka"``,
            ``"kendall"``, ``"pearson"`` or ``"spearman"``.
        log_images: send heatmaps to the Trainer's loggers.
        heatmap_range: fixed ``(vmin, vmax)`` of the heatmaps; by default
            :func:`~lightning_rsm.plotting.default_colour_range` of the first evaluation.

    Attributes:
        history: one dict per evaluation: ``epoch``, ``step`` and the logged scalars.
        layer_rsa: the last evaluation's layer x layer RSA matrix ``(L, L)``.

    Raises:
        MisconfigurationException: If an option has a value that is not allowed; at fit start,
            if a layer is not a module of the model, a ``ModelCheckpoint`` or ``EarlyStopping``
            monitors an ``rsm/`` key at other times than it is logged, or ``probe`` is None and
            the fit has no validation data.
        TypeError: If ``probe``, ``targets``, ``logits_fn``, ``input_fn``, ``label_fn`` or
            ``forward_fn`` have the wrong type, a probe batch has a structure they do not
            pick from (the message names it), or labels are not integer class ids or multi-hot
            values (at construction for tensors, at fit start for loaders).
        RuntimeError: At fit start, if the model fails on a probe batch (the message says how it
            was called and names ``forward_fn``).
        ValueError: If the probe or a target has a bad shape (at construction for tensors, at
            fit start for loaders), or, at fit start, a layer's output is not a representation.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_rsm.demo import DigitsCNN
        >>> x, y = torch.rand(20, 1, 32, 32), torch.arange(20) % 5
        >>> monitor = RSMMonitor((x[:10], y[:10]), ["block2", "block3"])
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[monitor], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> trainer.fit(DigitsCNN(width=4), DataLoader(TensorDataset(x, y), batch_size=10))
        >>> [row["epoch"] for row in monitor.history]
        [0, 1]
        >>> for name in sorted(monitor.history[1]):
        ...     if name.startswith("rsm/block3/semantic"):
        ...         print(name)
        rsm/block3/semantic/map
        rsm/block3/semantic/precision@1
        rsm/block3/semantic/probability_agreement
        rsm/block3/semantic/recall@1
    """

    def __init__(
        self,
        probe: Probe | None = None,
        layers: Sequence[str] = (),
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        probe_size: int = 500,
        input_fn: Picker | None = None,
        label_fn: Picker | None = None,
        forward_fn: ForwardFn | None = None,
        special_tokens: int = 0,
        tokens: str = "all",
        token_grid: TokenGrid = "auto",
        kernel: str = "cosine",
        matcher: str = "exact",
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        baseline: bool = True,
        max_positions: int | None = DEFAULT_MAX_POSITIONS,
        batch_size: int = 256,
        logits_fn: Callable[[Any], Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
        method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
    ) -> None:
        validation.check_layers(layers)
        self._schedule = Schedule.from_options(every_n_epochs, every_n_train_steps)
        validation.check_batch_options(input_fn, label_fn, forward_fn, probe_size)
        validation.check_token_options(special_tokens, tokens, token_grid)
        validation.check_options(
            kernel=kernel,
            matcher=matcher,
            sigma=sigma,
            window=window,
            tol=tol,
            max_positions=max_positions,
            batch_size=batch_size,
            method=method,
        )
        self.heatmap_range = validation.check_heatmap_range(heatmap_range)
        validation.check_logits_fn(logits_fn)
        validation.check_probe(probe, input_fn, label_fn)
        self.targets = validation.check_targets(targets)

        self.probe = probe
        self.layers = list(layers)
        self.every_n_epochs, self.every_n_train_steps = self._schedule
        self.probe_size = probe_size
        self.input_fn, self.label_fn, self.forward_fn = input_fn, label_fn, forward_fn
        self.special_tokens, self.tokens, self.token_grid = special_tokens, tokens, token_grid
        self.kernel = kernel
        self.matcher = matcher
        self.sigma = sigma
        self.window = window
        self.tol = tol
        self.baseline = baseline
        self.max_positions = max_positions
        self.batch_size = batch_size
        self.logits_fn = logits_fn
        self.method = method
        self.log_images = log_images

        self.history: list[dict[str, float]] = []
        self.layer_rsa: Tensor | None = None
        self._last_epoch = -1
        self._last_step = -1
        self._previous: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._inputs: Any = None  # a tensor (N, ...), or a dict/tuple of them
        self._labels: Tensor | None = None
        self._use_logits = True
        self._warnings = WarningCache()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=tuple(self.layers), kernel=self.kernel)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:  # else from the validation data, once the fit has set it up
            self._prepare_probe(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_score_readers(self._schedule, trainer, self)
        if self.probe is None:
            self._prepare_probe(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._evaluate_if_due(trainer, pl_module, after_step=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _validation_ends_the_epoch(trainer):
            self._evaluate_if_due(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate_if_due(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(row) for row in self.history],
            "last_epoch": self._last_epoch,
            "last_step": self._last_step,
            "previous": dict(self._previous),
            "ranges": {layer: list(r) for layer, r in self._ranges.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]
        self._last_epoch = state_dict["last_epoch"]
        self._last_step = state_dict.get("last_step", -1)
        self._previous = dict(state_dict["previous"])
        self._ranges = {layer: (r[0], r[1]) for layer, r in state_dict["ranges"].items()}

    # ------------------------------------------------------------------ fit start

    def _prepare_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the probe, check it, the targets and the layers, and find the logits."""
        validation.check_layers_exist(pl_module, self.layers)
        with untouched(pl_module):
            self._inputs, self._labels = self._read_probe(trainer)
        validation.check_targets_match_probe(self.targets, batch_length(self._inputs))
        if self._labels is None:
            self._warnings.warn("The probe has no labels: retrieval scores are not computed.")
        self._use_logits = True
        with untouched(pl_module):
            _, logits = self._capture(trainer, pl_module, slice_batch(self._inputs, 0, 2))
        if logits is not None:
            return
        if self.logits_fn is not None:
            raise ValueError(
                "Expected `logits_fn` to return logits of shape (B, K) with K >= 2 on a "
                "probe batch of B samples, but it did not."
            )
        self._use_logits = False
        self._warnings.warn(
            "The model's forward output on the probe is not a (B, K) logits tensor: the "
            "probability agreement is not computed. Pass `logits_fn` to pick the logits."
        )

    def _read_probe(self, trainer: pl.Trainer) -> tuple[Any, Tensor | None]:
        """The probe's inputs and labels: the one given, or chosen from the validation data."""
        if self.probe is not None:
            return read_probe(self.probe, self.batch_size, self.input_fn, self.label_fn)
        loader = validation_loader(trainer)
        probe = select_probe(loader, self.probe_size, self.batch_size, self.input_fn, self.label_fn)
        return trainer.strategy.broadcast(probe, src=0) if _is_distributed(trainer) else probe

    # ------------------------------------------------------------------ evaluation

    def _evaluate_if_due(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, after_step: bool = False
    ) -> None:
        last = {"last_epoch": self._last_epoch, "last_step": self._last_step}
        if not self._schedule.is_due(trainer, after_step=after_step, **last):
            return
        self._last_epoch, self._last_step = trainer.current_epoch, trainer.global_step
        with untouched(pl_module):
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Capture, then the RSMs (shared among ranks), then scores; each step ends with the
        ranks agreeing that it worked, so a fault on one rank never strands the others."""
        start = time.perf_counter()
        captured = self._attempt(trainer, lambda: self._capture(trainer, pl_module, self._inputs))
        if captured is None:
            return
        distributed = _is_distributed(trainer)
        if distributed:  # ranks' eval-mode buffers (batch norm) differ: score rank 0's view
            captured = trainer.strategy.broadcast(captured, src=0)
        features, logits = captured
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        semantic = self._attempt(
            trainer, lambda: self._semantic_rsms(features, distributed, progress)
        )
        if semantic is None:
            return
        scored = self._attempt(trainer, lambda: self._score(features, semantic, logits))
        if scored is None:
            return
        scores, rsms, layer_rsa = scored
        scores["rsm/time_s"] = time.perf_counter() - start
        self._log(trainer, pl_module, scores, rsms, layer_rsa)

    def _attempt(self, trainer: pl.Trainer, step: Callable[[], Any]) -> Any:
        """Run one step of an evaluation on every rank; None on every rank if any rank failed."""
        distributed = _is_distributed(trainer)
        result, failure = run_on_every_rank(step, distributed=distributed)
        if failure is not None:
            rank, error = failure
            where = f" on rank {rank}, so every rank skipped it" if distributed else ""
            rank_zero_warn(
                f"`RSMMonitor` evaluation at epoch {trainer.current_epoch} failed and was "
                f"skipped{where}; training goes on. {error}"
            )
        return result

    def _capture(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Any
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        return capture_layers(
            pl_module,
            self.layers,
            inputs,
            batch_size=self.batch_size,
            max_positions=self.max_positions,
            logits_fn=self.logits_fn,
            want_logits=self._use_logits,
            forward_context=trainer.precision_plugin.forward_context,
            forward_fn=self.forward_fn,
            special_tokens=self.special_tokens,
            tokens=self.tokens,
            token_grid=self.token_grid,
            warn=lambda message: self._warnings.warn(f"RSMMonitor: {message}"),
        )

    def _semantic_rsms(
        self, features: Mapping[str, Tensor], distributed: bool, progress: bool
    ) -> dict[str, Tensor]:
        """The semantic RSM of each layer; a bar of pairs solved per layer when ``progress``."""
        return {
            layer: semantic_rsm(
                concepts,
                kernel=self.kernel,
                matcher=self.matcher,
                sigma=self.sigma,
                window=self.window,
                tol=self.tol,
                distributed=distributed,
                progress=progress and f"RSMMonitor {layer}",
            )
            for layer, concepts in features.items()
        }

    def _score(
        self, features: Mapping[str, Tensor], semantic: Mapping[str, Tensor], logits: Tensor | None
    ) -> tuple[dict[str, float], Rsms, Tensor]:
        """Scores of every RSM, the RSMs (float32, CPU) and the layer x layer RSA."""
        output_similarity = None if logits is None else jensen_shannon_similarity(logits.double())
        scores: dict[str, float] = {}
        rsms: Rsms = {}
        for layer in self.layers:
            kinds = {"semantic": semantic[layer]}
            if self.baseline:
                kinds["baseline"] = spatio_semantic_rsm(
                    features[layer], kernel=self.kernel, sigma=self.sigma
                )
            rsms[layer] = kinds = {kind: rsm.float().cpu() for kind, rsm in kinds.items()}
            for kind, rsm in kinds.items():
                quality = rsm_scores(rsm, self._labels, output_similarity=output_similarity)
                scores.update({f"rsm/{layer}/{kind}/{k}": float(v) for k, v in quality.items()})
            scores.update(self._comparisons(layer, kinds["semantic"]))
        layer_rsa = rsa_matrix([kinds["semantic"] for kinds in rsms.values()], method=self.method)
        return scores, rsms, layer_rsa

    def _comparisons(self, layer: str, rsm: Tensor) -> dict[str, float]:
        """RSA with the previous evaluation's RSM and with each target."""
        others = {f"vs_{name}": target for name, target in self.targets.items()}
        if layer in self._previous:
            others["rsa_to_previous"] = self._previous[layer]
        return {
            f"rsm/{layer}/{name}": float(compare_rsms(rsm, other, method=self.method))
            for name, other in others.items()
        }

    # ------------------------------------------------------------------ logging

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        scores: dict[str, float],
        rsms: Rsms,
        layer_rsa: Tensor,
    ) -> None:
        self._schedule.log(trainer, pl_module, scores)
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **scores})
        self._previous = {layer: kinds["semantic"] for layer, kinds in rsms.items()}
        self.layer_rsa = layer_rsa
        if self.log_images and trainer.is_global_zero:
            self._log_images(trainer, rsms)

    def _log_images(self, trainer: pl.Trainer, rsms: Rsms) -> None:
        ranges = {layer: self._colour_range(layer, kinds) for layer, kinds in rsms.items()}
        images = rsm_images(rsms, self._labels, ranges, self.layer_rsa)
        log_images(trainer.loggers, images, trainer.global_step, warn_once=self._warnings.warn)

    def _colour_range(self, layer: str, kinds: Mapping[str, Tensor]) -> tuple[float, float]:
        """``heatmap_range``, or the layer's range fixed at its first evaluation."""
        if self.heatmap_range is not None:
            return self.heatmap_range
        if layer not in self._ranges:
            self._ranges[layer] = default_colour_range(self.kernel, list(kinds.values()))
        return self._ranges[layer]


def _validation_ends_the_epoch(trainer: pl.Trainer) -> bool:
    """A validation run at the end of a training epoch of ``fit`` (not the sanity check)."""
    return (
        not trainer.sanity_checking
        and is_fitting(trainer)
        and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    )


def _is_distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
