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

from lightning_rsm.callbacks.probe import check_layer_names, check_probe_tensors, split_batch
from lightning_rsm.functional.options import (
    COMPARISON_METHODS,
    check_choice,
    check_positive_int,
    check_rsm_options,
)
from lightning_rsm.namespaces import MisconfigurationException


@contextmanager
def _as_misconfiguration() -> Iterator[None]:
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
    every_n_epochs: object,
    kernel: object,
    matcher: object,
    sigma: object,
    window: object,
    tol: object,
    max_positions: object,
    batch_size: object,
    method: object,
) -> None:
    """The schedule, the RSM options, the batch size and the comparison method."""
    with _as_misconfiguration():
        check_positive_int(every_n_epochs, "every_n_epochs")
        check_rsm_options(kernel, matcher, sigma, window, tol, max_positions)
        check_positive_int(batch_size, "batch_size")
        check_choice(method, COMPARISON_METHODS, "method")


def check_background(background: object, num_workers: object) -> None:
    """``background`` a bool; ``num_workers`` None or a positive int."""
    if not isinstance(background, bool):
        raise MisconfigurationException(
            f"Expected `background` to be True or False, but got {background!r}."
        )
    with _as_misconfiguration():
        check_positive_int(num_workers, "num_workers", optional=True)


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


def check_probe(probe: object) -> None:
    """A loader or dataset (read at fit start), or tensors checked now."""
    if isinstance(probe, (tuple, list)):
        check_probe_tensors(*split_batch(probe, "`probe`"))
    elif not isinstance(probe, (DataLoader, Dataset)):
        raise TypeError(
            "Expected `probe` to be a DataLoader, a Dataset or a tuple (inputs, labels) of "
            f"tensors, but got {type(probe).__name__}."
        )


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
    with _as_misconfiguration():
        check_layer_names(model, layers)
