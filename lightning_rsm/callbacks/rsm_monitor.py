"""``RSMMonitor``: semantic RSMs of chosen layers on a fixed probe set, logged during training."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_rsm.functional import (
    compare_rsms,
    jensen_shannon_similarity,
    retrieval_average_precision,
    retrieval_precision,
    semantic_rsm,
    spatio_semantic_rsm,
    to_concepts,
)
from lightning_rsm.functional.comparison import _COMPARISONS
from lightning_rsm.functional.representations import _is_positive_int
from lightning_rsm.functional.rsm import _check_options
from lightning_rsm.plotting import heatmap_rgb, sort_by_label

Probe = DataLoader | Dataset | tuple[Tensor, ...] | list[Tensor]


def _first_tensor(output: Any) -> Tensor | None:
    """The output itself if it is a tensor, else the first tensor in a tuple, list or mapping."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((item for item in output if isinstance(item, Tensor)), None)
    return None


def _split_batch(batch: Any, where: str) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels)`` from a tensor, or a tuple/list of one or two tensors."""
    if isinstance(batch, Tensor):
        return batch, None
    if (
        isinstance(batch, (tuple, list))
        and len(batch) in (1, 2)
        and all(isinstance(item, Tensor) for item in batch)
    ):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    kind = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        kind = f"a {kind} of length {len(batch)}"
    raise TypeError(
        f"Expected {where} to be a tensor or a tuple (inputs, labels) of tensors, but got {kind}."
    )


def _check_probe_tensors(inputs: Tensor, labels: Tensor | None) -> None:
    if inputs.ndim < 1 or inputs.shape[0] < 2:
        raise ValueError(
            "Expected the probe inputs to hold at least 2 samples along dim 0, "
            f"but got shape {tuple(inputs.shape)}."
        )
    if labels is None:
        return
    if labels.ndim not in (1, 2) or labels.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"Expected the probe labels to have shape ({inputs.shape[0]},) or "
            f"({inputs.shape[0]}, L) to match the inputs, but got shape {tuple(labels.shape)}."
        )


@contextmanager
def _untouched(pl_module: pl.LightningModule) -> Iterator[None]:
    """Run a block without gradients and restore RNG states and every submodule's mode."""
    modes = [(module, module.training) for module in pl_module.modules()]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    python_state = random.getstate()
    numpy_state = np.random.get_state()  # noqa: NPY002 (the global state users seed)
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002


class RSMMonitor(Callback):
    r"""Monitor semantic RSMs of chosen layers on a fixed probe set during training.

    On each evaluation (every ``every_n_epochs`` epochs: after the epoch's validation, or after
    the training epoch when no validation ran in it; never during the sanity check) the probe
    is run through the model in eval mode, the outputs of ``layers`` are captured with forward
    hooks, and per layer the semantic RSM (and the baseline, spatially aligned RSM) is computed
    and scored. Scalars go through ``pl_module.log``, so ``ModelCheckpoint`` and
    ``EarlyStopping`` can monitor them; every logger receives them. With a
    ``TensorBoardLogger`` the RSM heatmaps (samples sorted by label, a colour scale fixed for the
    whole run) and the layer x layer RSA matrix are also written as images (by rank 0).

    Logged scalars (``<layer>`` as in ``model.named_modules()``, ``<kind>`` is ``semantic`` or,
    with ``baseline=True``, ``baseline``):

    ===================================  =========================================================
    ``rsm/<layer>/<kind>/map``           retrieval mean average precision (needs labels)
    ``rsm/<layer>/<kind>/precision@1``   retrieval precision at 1 (needs labels)
    ``rsm/<layer>/<kind>/agreement``     probability agreement with the model's output (needs
                                         logits)
    ``rsm/<layer>/rsa_to_previous``      RSA of the semantic RSM with the previous evaluation's
                                         (1 = unchanged); from the second evaluation on
    ``rsm/<layer>/vs_<name>``            RSA of the semantic RSM with the target RSM ``<name>``
    ``rsm/time_s``                       seconds the evaluation took
    ===================================  =========================================================

    Images: ``rsm/<layer>/<kind>/heatmap`` and ``rsm/layer_rsa`` (the layer x layer RSA of the
    semantic RSMs, layers in the order given; colour scale ``[-1, 1]``).

    Args:
        probe: the probe set, fixed for the run: a ``DataLoader`` or ``Dataset`` yielding tensors
            or ``(inputs, labels)`` tuples, or a tuple ``(inputs,)`` / ``(inputs, labels)`` of
            tensors. It is read once, at fit start, and kept in memory. Labels of shape ``(N,)``
            (or ``(N, L)`` multi-label) enable the retrieval scores.
        layers: module names as in ``model.named_modules()``. Tuple outputs are reduced to
            their first tensor. Outputs may have shape ``(N, C, H, W)``, ``(N, T, D)`` or
            ``(N, D)``.
        every_n_epochs: evaluate after every n-th epoch.
        kernel: RSM kernel, one of ``"cosine"``, ``"inner"``, ``"rbf"``.
        matcher: LAP solver of the semantic RSM, as in
            :func:`~lightning_rsm.functional.semantic_rsm`.
        sigma: RBF bandwidth of both RSMs; default the median heuristic of each evaluation.
        window: window size of ``matcher="windowed"``.
        tol: certified cosine-scale tolerance of ``matcher="auction"``.
        baseline: also compute the spatially aligned baseline RSM and its scores.
        max_positions: cap on the positions (``H * W`` or ``T``) per sample; larger maps are
            reduced with adaptive average pooling before the RSMs are computed. The exact
            matcher costs about ``O(S^3)`` per pair of samples, so the default (64, an 8 x 8
            grid) keeps one evaluation of a few hundred samples at seconds; ``None`` keeps every
            position (exact for the layer, but slow for large maps).
        batch_size: probe samples per forward pass.
        logits_fn: maps the model's forward output on a probe batch to logits of shape
            ``(B, K)``. By default the forward output (its first tensor) is used when it has
            that shape; otherwise the probability agreement is skipped with one warning.
        targets: reference RSMs of shape ``(N, N)`` over the same probe (another model, a
            teacher, human similarity judgements), by name; each layer's semantic RSM is
            compared with each target (``compare_rsms`` with ``rsa_method``).
        rsa_method: how RSMs are compared (drift, layer x layer, targets), one of
            ``"cka"``, ``"kendall"``, ``"pearson"``, ``"spearman"``.
        log_images: write heatmaps to TensorBoard loggers.
        heatmap_range: fixed ``(vmin, vmax)`` of the heatmaps' colour scale. By default
            ``(0, 1)`` for ``"rbf"``; for ``"cosine"`` ``(0, 1)`` when the first evaluation has
            no negative entry, else ``(-1, 1)``; for ``"inner"`` the range of the first
            evaluation.

    Attributes:
        history: one dict per evaluation: ``epoch``, ``step`` and the logged scalars.
        layer_rsa: the last evaluation's layer x layer RSA matrix ``(L, L)`` of the semantic
            RSMs, layers in the order of ``layers``.

    Raises:
        MisconfigurationException: If ``layers``, ``every_n_epochs``, ``kernel``, ``matcher``,
            ``sigma``, ``window``, ``tol``, ``max_positions``, ``batch_size``, ``rsa_method`` or
            ``heatmap_range`` have a
            value that is not allowed; at fit start, if a layer is not a module of the model.
        TypeError: If ``probe``, ``targets`` or ``logits_fn`` have the wrong type.
        ValueError: If the probe or a target has a bad shape (at construction for tensors, at
            fit start for loaders), or, at fit start, a layer's output is not a representation.

    Example:
        >>> import pytorch_lightning as pl
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
        ...     if name.startswith("rsm/block3/"):
        ...         print(name)
        rsm/block3/baseline/agreement
        rsm/block3/baseline/map
        rsm/block3/baseline/precision@1
        rsm/block3/rsa_to_previous
        rsm/block3/semantic/agreement
        rsm/block3/semantic/map
        rsm/block3/semantic/precision@1
    """

    def __init__(
        self,
        probe: Probe,
        layers: Sequence[str],
        *,
        every_n_epochs: int = 1,
        kernel: str = "cosine",
        matcher: str = "exact",
        sigma: float | None = None,
        window: int = 8,
        tol: float = 1e-4,
        baseline: bool = True,
        max_positions: int | None = 64,
        batch_size: int = 256,
        logits_fn: Callable[[Any], Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
        rsa_method: str = "spearman",
        log_images: bool = True,
        heatmap_range: tuple[float, float] | None = None,
    ) -> None:
        if not (
            isinstance(layers, (list, tuple))
            and layers
            and all(isinstance(layer, str) and layer for layer in layers)
        ):
            raise MisconfigurationException(
                f"Expected `layers` to be a non-empty list of module names, but got {layers!r}."
            )
        if len(set(layers)) != len(layers):
            raise MisconfigurationException(
                f"Expected `layers` to hold each name once, but got {list(layers)}."
            )
        if not (
            isinstance(every_n_epochs, int)
            and not isinstance(every_n_epochs, bool)
            and every_n_epochs >= 1
        ):
            raise MisconfigurationException(
                f"Expected `every_n_epochs` to be an int of at least 1, but got {every_n_epochs!r}."
            )
        if rsa_method not in _COMPARISONS:
            raise MisconfigurationException(
                f"Expected `rsa_method` to be one of {sorted(_COMPARISONS)}, "
                f"but got {rsa_method!r}."
            )
        try:
            _check_options(kernel, matcher, sigma, window, tol)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        for name, value in (("max_positions", max_positions), ("batch_size", batch_size)):
            if value is None and name == "max_positions":
                continue
            if not _is_positive_int(value):
                raise MisconfigurationException(
                    f"Expected `{name}` to be a positive int, but got {value!r}."
                )
        if heatmap_range is not None and not (
            isinstance(heatmap_range, (tuple, list))
            and len(heatmap_range) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in heatmap_range)
            and heatmap_range[1] > heatmap_range[0]
        ):
            raise MisconfigurationException(
                "Expected `heatmap_range` to be None or a pair (vmin, vmax) of finite numbers "
                f"with vmax > vmin, but got {heatmap_range!r}."
            )
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(
                f"Expected `logits_fn` to be callable or None, but got {type(logits_fn).__name__}."
            )
        if isinstance(probe, (tuple, list)):
            inputs, labels = _split_batch(probe, "`probe`")
            _check_probe_tensors(inputs, labels)
        elif not isinstance(probe, (DataLoader, Dataset)):
            raise TypeError(
                "Expected `probe` to be a DataLoader, a Dataset or a tuple (inputs, labels) of "
                f"tensors, but got {type(probe).__name__}."
            )
        self.targets = self._check_targets(targets)

        self.probe = probe
        self.layers = list(layers)
        self.every_n_epochs = every_n_epochs
        self.kernel = kernel
        self.matcher = matcher
        self.sigma = sigma
        self.window = window
        self.tol = tol
        self.baseline = baseline
        self.max_positions = max_positions
        self.batch_size = batch_size
        self.logits_fn = logits_fn
        self.rsa_method = rsa_method
        self.log_images = log_images
        self.heatmap_range = None if heatmap_range is None else tuple(map(float, heatmap_range))

        self.history: list[dict[str, float]] = []
        self.layer_rsa: Tensor | None = None
        self._last_epoch = -1
        self._previous: dict[str, Tensor] = {}
        self._ranges: dict[str, tuple[float, float]] = {}
        self._inputs: Tensor | None = None
        self._labels: Tensor | None = None
        self._use_logits = True
        self._warned: set[str] = set()

    @staticmethod
    def _check_targets(targets: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        if targets is None:
            return {}
        if not isinstance(targets, Mapping):
            raise TypeError(
                "Expected `targets` to be a mapping of name -> RSM tensor, "
                f"but got {type(targets).__name__}."
            )
        checked = {}
        for name, rsm in targets.items():
            if not (isinstance(name, str) and name):
                raise TypeError(f"Expected `targets` keys to be non-empty str, but got {name!r}.")
            if not isinstance(rsm, Tensor):
                raise TypeError(
                    f"Expected `targets[{name!r}]` to be a tensor, but got {type(rsm).__name__}."
                )
            if rsm.ndim != 2 or rsm.shape[0] != rsm.shape[1] or not bool(rsm.isfinite().all()):
                raise ValueError(
                    f"Expected `targets[{name!r}]` to be a finite square matrix (N, N), "
                    f"but got shape {tuple(rsm.shape)}."
                )
            checked[name] = rsm.detach().float().cpu()
        return checked

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=tuple(self.layers), kernel=self.kernel)

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        unknown = [layer for layer in self.layers if layer not in modules]
        if unknown:
            raise MisconfigurationException(
                f"`RSMMonitor` got layers {unknown} that are not modules of "
                f"{type(pl_module).__name__}; expected names from `model.named_modules()`: "
                f"{[name for name in modules if name]}."
            )
        with _untouched(pl_module):
            self._inputs, self._labels = self._read_probe()
        n = self._inputs.shape[0]
        for name, rsm in self.targets.items():
            if rsm.shape[0] != n:
                raise ValueError(
                    f"Expected `targets[{name!r}]` to have shape ({n}, {n}) like the probe, "
                    f"but got shape {tuple(rsm.shape)}."
                )
        if self._labels is None:
            self._warn_once("The probe has no labels: retrieval scores are not computed.")
        self._use_logits = True
        with _untouched(pl_module):
            _, logits = self._forward(trainer, pl_module, self._inputs[:2])
        if logits is None:
            if self.logits_fn is not None:
                raise ValueError(
                    "Expected `logits_fn` to return logits of shape (B, K) with K >= 2 on a "
                    "probe batch of B samples, but it did not."
                )
            self._use_logits = False
            self._warn_once(
                "The model's forward output on the probe is not a (B, K) logits tensor: the "
                "probability agreement is not computed. Pass `logits_fn` to pick the logits."
            )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ):
            return
        self._maybe_evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(row) for row in self.history],
            "last_epoch": self._last_epoch,
            "previous": dict(self._previous),
            "ranges": {layer: list(r) for layer, r in self._ranges.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict["history"]]
        self._last_epoch = state_dict["last_epoch"]
        self._previous = dict(state_dict["previous"])
        self._ranges = {layer: (r[0], r[1]) for layer, r in state_dict["ranges"].items()}

    # ------------------------------------------------------------------ evaluation

    def _maybe_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self._last_epoch or (epoch + 1) % self.every_n_epochs:
            return
        self._last_epoch = epoch
        start = time.perf_counter()
        try:
            with _untouched(pl_module):
                scores, rsms = self._evaluate(trainer, pl_module)
        except Exception as error:  # a fault in monitoring must not stop training
            rank_zero_warn(
                f"`RSMMonitor` evaluation at epoch {epoch} failed and was skipped; training goes "
                f"on. {type(error).__name__}: {error}"
            )
            return
        scores["rsm/time_s"] = time.perf_counter() - start
        for name, value in scores.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, batch_size=1)
        self.history.append({"epoch": epoch, "step": trainer.global_step, **scores})
        self._previous = {layer: kinds["semantic"] for layer, kinds in rsms.items()}
        if self.log_images and trainer.is_global_zero:
            self._log_images(trainer, rsms)

    def _read_probe(self) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.probe, (tuple, list)):
            inputs, labels = _split_batch(self.probe, "`probe`")
        else:
            loader = self.probe
            if not isinstance(loader, DataLoader):
                loader = DataLoader(loader, batch_size=self.batch_size, shuffle=False)
            parts = [_split_batch(batch, "each probe batch") for batch in loader]
            if not parts:
                raise ValueError("Expected the probe to hold at least 2 samples, but it is empty.")
            inputs = torch.cat([x for x, _ in parts])
            has_labels = {y is not None for _, y in parts}
            if len(has_labels) != 1:
                raise ValueError("Expected every probe batch to have labels, or none to have them.")
            labels = torch.cat([y for _, y in parts]) if has_labels == {True} else None
        _check_probe_tensors(inputs, labels)
        return inputs.detach(), None if labels is None else labels.detach().cpu()

    def _forward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, inputs: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Concept vectors ``(N, S, C)`` of each layer (pooled to ``max_positions``), and logits
        ``(N, K)`` or None."""
        modules = dict(pl_module.named_modules())
        captured: dict[str, list[Tensor]] = {layer: [] for layer in self.layers}

        def hook(layer: str) -> Callable[..., None]:
            def capture(module: torch.nn.Module, args: Any, output: Any) -> None:
                x = _first_tensor(output)
                if x is None:
                    raise TypeError(
                        f"Expected layer {layer!r} to output a tensor or a tuple holding one, "
                        f"but got {type(output).__name__}."
                    )
                # pooled per batch, so a large map is never held for the whole probe
                x = to_concepts(x.detach().float(), max_positions=self.max_positions, name=layer)
                captured[layer].append(x)

            return capture

        handles = [modules[layer].register_forward_hook(hook(layer)) for layer in self.layers]
        logits_parts: list[Tensor] | None = [] if self._use_logits else None
        pl_module.eval()
        try:
            for start in range(0, inputs.shape[0], self.batch_size):
                batch = inputs[start : start + self.batch_size].to(pl_module.device)
                with trainer.precision_plugin.forward_context():
                    output = pl_module(batch)
                for layer, parts in captured.items():
                    calls = sum(len(part) for part in parts) - start
                    if calls != batch.shape[0]:
                        raise ValueError(
                            f"Expected layer {layer!r} to output {batch.shape[0]} samples along "
                            f"dim 0 in a forward pass of {batch.shape[0]}, but got {calls} (a "
                            "module that does not run, runs repeatedly or is not batch-first)."
                        )
                if logits_parts is not None:
                    logits = self.logits_fn(output) if self.logits_fn else _first_tensor(output)
                    if (
                        isinstance(logits, Tensor)
                        and logits.ndim == 2
                        and logits.shape[0] == batch.shape[0]
                        and logits.shape[1] >= 2
                    ):
                        logits_parts.append(logits.detach().float().cpu())
                    else:
                        logits_parts = None
        finally:
            for handle in handles:
                handle.remove()
        features = {layer: torch.cat(parts) for layer, parts in captured.items()}
        return features, None if logits_parts is None else torch.cat(logits_parts)

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
        assert self._inputs is not None  # set in on_fit_start
        features, logits = self._forward(trainer, pl_module, self._inputs)
        labels = self._labels
        # The probability agreement is the Pearson RSA of each RSM with this one matrix of
        # output similarities (as in probability_agreement); it is formed once per evaluation.
        output_similarity = None if logits is None else jensen_shannon_similarity(logits.double())
        scores: dict[str, float] = {}
        rsms: dict[str, dict[str, Tensor]] = {}
        for layer in self.layers:
            concepts = features.pop(layer)
            semantic = semantic_rsm(
                concepts,
                kernel=self.kernel,
                matcher=self.matcher,
                sigma=self.sigma,
                window=self.window,
                tol=self.tol,
            )
            kinds = {"semantic": semantic}
            if self.baseline:
                kinds["baseline"] = spatio_semantic_rsm(
                    concepts, kernel=self.kernel, sigma=self.sigma
                )
            kinds = {kind: rsm.detach().float().cpu() for kind, rsm in kinds.items()}
            rsms[layer] = kinds
            for kind, rsm in kinds.items():
                prefix = f"rsm/{layer}/{kind}"
                if labels is not None:
                    scores[f"{prefix}/map"] = float(retrieval_average_precision(rsm, labels))
                    scores[f"{prefix}/precision@1"] = float(retrieval_precision(rsm, labels, k=1))
                if output_similarity is not None:
                    scores[f"{prefix}/agreement"] = float(
                        compare_rsms(rsm, output_similarity, method="pearson")
                    )
            semantic = kinds["semantic"]
            if layer in self._previous:
                scores[f"rsm/{layer}/rsa_to_previous"] = float(
                    compare_rsms(semantic, self._previous[layer], method=self.rsa_method)
                )
            for name, target in self.targets.items():
                scores[f"rsm/{layer}/vs_{name}"] = float(
                    compare_rsms(semantic, target, method=self.rsa_method)
                )
        self.layer_rsa = self._layer_rsa(
            {layer: kinds["semantic"] for layer, kinds in rsms.items()}
        )
        return scores, rsms

    def _layer_rsa(self, rsms: Mapping[str, Tensor]) -> Tensor:
        """RSA (``rsa_method``) between every two layers' RSMs, shape ``(L, L)``."""
        names = list(rsms)
        matrix = torch.ones(len(names), len(names))
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                value = float(compare_rsms(rsms[a], rsms[names[j]], method=self.rsa_method))
                matrix[i, j] = matrix[j, i] = value
        return matrix

    def _colour_range(self, layer: str, kinds: Mapping[str, Tensor]) -> tuple[float, float]:
        if self.heatmap_range is not None:
            return self.heatmap_range
        if layer not in self._ranges:
            low = min(float(rsm.min()) for rsm in kinds.values())
            high = max(float(rsm.max()) for rsm in kinds.values())
            if self.kernel == "rbf":
                self._ranges[layer] = (0.0, 1.0)
            elif self.kernel == "cosine":
                self._ranges[layer] = (0.0 if low >= 0 else -1.0, 1.0)
            else:
                self._ranges[layer] = (low, high) if high > low else (low - 1.0, high + 1.0)
        return self._ranges[layer]

    def _log_images(self, trainer: pl.Trainer, rsms: Mapping[str, Mapping[str, Tensor]]) -> None:
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        step = trainer.global_step
        images = {}
        for layer, kinds in rsms.items():
            vmin, vmax = self._colour_range(layer, kinds)
            for kind, rsm in kinds.items():
                sorted_rsm = sort_by_label(rsm, self._labels)
                images[f"rsm/{layer}/{kind}/heatmap"] = heatmap_rgb(sorted_rsm, vmin, vmax)
        images["rsm/layer_rsa"] = heatmap_rgb(self.layer_rsa, -1.0, 1.0)
        for writer in writers:
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)
