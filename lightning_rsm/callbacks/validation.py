"""The checks of ``RSMMonitor``'s arguments, one named helper per group of options.

Bad option values raise ``MisconfigurationException`` (as Lightning's own callbacks do) with
the message of the shared check in :mod:`lightning_rsm.functional.options`; bad types raise
``TypeError``; bad shapes ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_rsm.callbacks.batches import Picker, split_batch
from lightning_rsm.callbacks.probe import check_layer_names, check_probe_tensors
from lightning_rsm.functional import representations
from lightning_rsm.functional.options import (
    COMPARISON_METHODS,
    check_choice,
    check_positive_int,
    check_rsm_options,
    is_positive_int,
)
from lightning_rsm.namespaces import MisconfigurationException


@contextmanager
def as_misconfiguration() -> Iterator[None]:
    """Raise a ``ValueError`` of a shared check as ``MisconfigurationException``, same text."""
    try:
        yield
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error


def check_layers(layers: object) -> None:
    """A non-empty list or tuple of distinct, non-empty module names."""
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


def check_options(
    *,
    kernel: object,
    matcher: object,
    sigma: object,
    window: object,
    tol: object,
    max_positions: object,
    batch_size: object,
    method: object,
) -> None:
    """The RSM options, the batch size and the comparison method (the schedule: ``schedule``)."""
    with as_misconfiguration():
        check_rsm_options(kernel, matcher, sigma, window, tol, max_positions)
        check_positive_int(batch_size, "batch_size")
        check_choice(method, COMPARISON_METHODS, "method")


def check_background(background: object, num_workers: object) -> None:
    """``background`` a bool; ``num_workers`` None or a positive int."""
    if not isinstance(background, bool):
        raise MisconfigurationException(
            f"Expected `background` to be True or False, but got {background!r}."
        )
    with as_misconfiguration():
        check_positive_int(num_workers, "num_workers", optional=True)


def check_warm_start_bytes(warm_start_bytes: object) -> None:
    """A non-negative int (0: no warm starts)."""
    if not (
        isinstance(warm_start_bytes, int)
        and not isinstance(warm_start_bytes, bool)
        and warm_start_bytes >= 0
    ):
        raise MisconfigurationException(
            f"Expected `warm_start_bytes` to be a non-negative int, but got {warm_start_bytes!r}."
        )


def check_heatmap_range(heatmap_range: object) -> tuple[float, float] | None:
    """None, or a pair ``(vmin, vmax)`` of finite numbers with ``vmax > vmin``."""
    if heatmap_range is None:
        return None
    if not (
        isinstance(heatmap_range, (tuple, list))
        and len(heatmap_range) == 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in heatmap_range)
        and heatmap_range[1] > heatmap_range[0]
    ):
        raise MisconfigurationException(
            "Expected `heatmap_range` to be None or a pair (vmin, vmax) of finite numbers "
            f"with vmax > vmin, but got {heatmap_range!r}."
        )
    return float(heatmap_range[0]), float(heatmap_range[1])


def check_logits_fn(logits_fn: object) -> None:
    if logits_fn is not None and not callable(logits_fn):
        raise TypeError(
            f"Expected `logits_fn` to be callable or None, but got {type(logits_fn).__name__}."
        )


def check_probe(probe: object, input_fn: Picker | None, label_fn: Picker | None) -> None:
    """None (the validation data), a loader or dataset (read at fit start), or tensors checked
    now."""
    if isinstance(probe, (tuple, list, Mapping)):
        check_probe_tensors(*split_batch(probe, "`probe`", input_fn, label_fn))
    elif probe is not None and not isinstance(probe, (DataLoader, Dataset)):
        raise TypeError(
            "Expected `probe` to be a DataLoader, a Dataset, a tuple (inputs, labels) of tensors "
            f"or None (samples of the validation data), but got {type(probe).__name__}."
        )


def check_batch_options(
    input_fn: object, label_fn: object, forward_fn: object, probe_size: object
) -> None:
    """How batches are split and fed to the model, and the size of a probe from validation."""
    for name, picker in (("input_fn", input_fn), ("label_fn", label_fn)):
        if not (picker is None or callable(picker) or isinstance(picker, (str, int))):
            raise TypeError(
                f"Expected `{name}` to be None, a key (str), an index (int) or a function of "
                f"the batch, but got {type(picker).__name__}."
            )
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            "Expected `forward_fn` to be None or callable as forward_fn(model, inputs), "
            f"but got {type(forward_fn).__name__}."
        )
    if not (is_positive_int(probe_size) and probe_size >= 2):
        raise MisconfigurationException(
            f"Expected `probe_size` to be an int of at least 2, but got {probe_size!r}."
        )


def check_token_options(special_tokens: object, tokens: object, token_grid: object) -> None:
    """Which tokens of ``(N, T, D)`` layers are kept, and how patch tokens are pooled."""
    with as_misconfiguration():
        representations.check_token_options(special_tokens, tokens, token_grid)


def check_targets(targets: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Named reference RSMs ``(N, N)``, returned as float32 CPU tensors."""
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


def check_targets_match_probe(targets: Mapping[str, Tensor], n: int) -> None:
    for name, rsm in targets.items():
        if rsm.shape[0] != n:
            raise ValueError(
                f"Expected `targets[{name!r}]` to have shape ({n}, {n}) like the probe, "
                f"but got shape {tuple(rsm.shape)}."
            )


def check_layers_exist(model: nn.Module, layers: Sequence[str]) -> None:
    """Every layer is a module of ``model`` (the message lists the names there are)."""
    with as_misconfiguration():
        check_layer_names(model, layers)
