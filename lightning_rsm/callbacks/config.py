"""Every option of :class:`~lightning_rsm.callbacks.RSMMonitor`, checked once, in one place.

:class:`MonitorConfig` is frozen: built by ``RSMMonitor.__init__`` from its arguments, read by
everything else. Bad values raise ``MisconfigurationException`` (as Lightning's own callbacks
do), bad types ``TypeError``, bad shapes ``ValueError``; the RSM options share their checks with
:func:`~lightning_rsm.functional.semantic_rsm` (:mod:`lightning_rsm.functional.options`).
Adding an option: a field here with its check in :meth:`MonitorConfig.__post_init__`, the line
that uses it, and its entry in ``RSMMonitor``'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_rsm.archive import Ids
from lightning_rsm.callbacks.batches import (
    ForwardFn,
    ImageFn,
    LogitsFn,
    Picker,
    ReferenceNetwork,
    split_batch,
)
from lightning_rsm.callbacks.probe import Probe, check_probe_tensors
from lightning_rsm.functional import representations
from lightning_rsm.functional.options import (
    COMPARISON_METHODS,
    DEFAULT_MAX_POSITIONS,
    check_choice,
    check_rsm_options,
)
from lightning_rsm.functional.representations import TokenGrid
from lightning_rsm.namespaces import MisconfigurationException

WHEN_BUSY = ("wait", "skip")  # what a due evaluation does while the worker is still busy


@contextmanager
def as_misconfiguration() -> Iterator[None]:
    """Raise a ``ValueError`` of a shared check as ``MisconfigurationException``, same text."""
    try:
        yield
    except ValueError as error:
        raise MisconfigurationException(str(error)) from error


@dataclass(frozen=True, eq=False)
class MonitorConfig:
    """The options of ``RSMMonitor`` (documented there), checked and normalised on creation.

    ``layers`` becomes a tuple, ``targets`` a dict of float32 CPU tensors and reference networks
    (computed at fit start), ``heatmap_range`` a pair of floats, and ``every_n_epochs`` 1 when
    neither schedule option is given.

    Raises:
        MisconfigurationException: If an option has a value that is not allowed.
        TypeError: If an option has the wrong type.
        ValueError: If the probe or a target has a bad shape.

    Example:
        >>> config = MonitorConfig(layers=["conv"], every_n_train_steps=50)
        >>> config.layers, config.every_n_epochs, config.by_steps
        (('conv',), None, True)
        >>> MonitorConfig(layers=["conv"], baseline="no")
        Traceback (most recent call last):
        ...
        TypeError: Expected `baseline` to be True or False, but got 'no'.
    """

    layers: tuple[str, ...]
    probe: Probe | None = None
    every_n_epochs: int | None = None
    every_n_train_steps: int | None = None
    probe_size: int = 500
    input_fn: Picker | None = None
    label_fn: Picker | None = None
    forward_fn: ForwardFn | None = None
    special_tokens: int = 0
    tokens: str = "all"
    token_grid: TokenGrid = "auto"
    kernel: str = "cosine"
    matcher: str = "exact"
    sigma: float | None = None
    window: int = 8
    tol: float = 1e-4
    baseline: bool = True
    max_positions: int | None = DEFAULT_MAX_POSITIONS
    batch_size: int = 256
    logits_fn: LogitsFn | None = None
    targets: Mapping[str, ReferenceNetwork | Tensor] = field(default_factory=dict)
    method: str = "spearman"
    log_images: bool = True
    heatmap_range: tuple[float, float] | None = None
    image_fn: ImageFn | None = None
    background: bool = False
    solver_threads: int | None = None
    warm_start_bytes: int = 2**28
    when_busy: str = "wait"
    save_rsms: bool = False
    save_every: int | None = 1
    save_last: int = 1
    probe_ids: Ids | None = None

    def __post_init__(self) -> None:
        self._set("layers", _checked_layers(self.layers))
        self._set("every_n_epochs", self._checked_schedule())
        _check_int(self.probe_size, "probe_size", 2)
        for name in ("input_fn", "label_fn"):
            _check_picker(getattr(self, name), name)
        _check_callable(
            self.forward_fn, "forward_fn", "None or callable as forward_fn(model, inputs)"
        )
        _check_callable(self.logits_fn, "logits_fn", "callable or None")
        _check_callable(
            self.image_fn, "image_fn", "None or callable mapping the probe inputs to images"
        )
        with as_misconfiguration():
            representations.check_token_options(self.special_tokens, self.tokens, self.token_grid)
            check_rsm_options(
                self.kernel, self.matcher, self.sigma, self.window, self.tol, self.max_positions
            )
            check_choice(self.method, COMPARISON_METHODS, "method")
        _check_int(self.batch_size, "batch_size", 1)
        for name in ("baseline", "log_images", "background", "save_rsms"):
            _check_bool(getattr(self, name), name)
        _check_int(self.solver_threads, "solver_threads", 1, optional=True)
        _check_int(self.warm_start_bytes, "warm_start_bytes", 0)
        self._check_when_busy()
        _check_int(self.save_every, "save_every", 1, optional=True)
        _check_int(self.save_last, "save_last", 1)
        _check_probe_ids(self.probe_ids, self.probe)
        self._set("heatmap_range", _checked_heatmap_range(self.heatmap_range))
        _check_probe(self.probe, self.input_fn, self.label_fn)
        self._set("targets", _checked_targets(self.targets))

    @property
    def by_steps(self) -> bool:
        """Whether evaluations are scheduled by optimizer steps (else by epochs)."""
        return self.every_n_train_steps is not None

    @property
    def rsm_options(self) -> dict[str, Any]:
        """The options of :func:`~lightning_rsm.functional.semantic_rsm` the monitor sets:
        ``kernel``, ``matcher``, ``sigma``, ``window``, ``tol``."""
        names = ("kernel", "matcher", "sigma", "window", "tol")
        return {name: getattr(self, name) for name in names}

    @property
    def feature_options(self) -> dict[str, Any]:
        """How features are taken from a model (the monitored one or a reference network):
        ``batch_size``, ``max_positions``, ``forward_fn`` and the token options."""
        names = ("batch_size", "max_positions", "forward_fn", "special_tokens", "tokens")
        return {name: getattr(self, name) for name in (*names, "token_grid")}

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass on creation

    def _check_when_busy(self) -> None:
        """``"wait"`` or ``"skip"``; skipping needs a worker that can be busy."""
        with as_misconfiguration():
            check_choice(self.when_busy, WHEN_BUSY, "when_busy")
        if self.when_busy == "skip" and not self.background:
            raise MisconfigurationException(
                "Expected `when_busy='skip'` only with `background=True` (evaluations run "
                "inline otherwise, and the worker is never busy), but got background=False."
            )

    def _checked_schedule(self) -> int | None:
        """``every_n_epochs``, 1 when neither it nor ``every_n_train_steps`` is given."""
        if self.every_n_epochs is not None and self.every_n_train_steps is not None:
            raise MisconfigurationException(
                "Expected only one of `every_n_epochs` and `every_n_train_steps` to be set, but "
                f"got every_n_epochs={self.every_n_epochs!r} and "
                f"every_n_train_steps={self.every_n_train_steps!r}."
            )
        _check_int(self.every_n_epochs, "every_n_epochs", 1, optional=True)
        _check_int(self.every_n_train_steps, "every_n_train_steps", 1, optional=True)
        if self.every_n_train_steps is None and self.every_n_epochs is None:
            return 1
        return self.every_n_epochs


def _check_int(value: object, name: str, minimum: int, *, optional: bool = False) -> None:
    """The one rule for int options: an int (not a bool) of at least ``minimum``."""
    if optional and value is None:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        expected = {0: "a non-negative int", 1: "a positive int"}.get(
            minimum, f"an int of at least {minimum}"
        )
        expected += " or None" if optional else ""
        raise MisconfigurationException(f"Expected `{name}` to be {expected}, but got {value!r}.")


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be True or False, but got {value!r}.")


def _check_callable(value: object, name: str, expected: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"Expected `{name}` to be {expected}, but got {type(value).__name__}.")


def _check_picker(picker: object, name: str) -> None:
    if not (picker is None or callable(picker) or isinstance(picker, (str, int))):
        raise TypeError(
            f"Expected `{name}` to be None, a key (str), an index (int) or a function of "
            f"the batch, but got {type(picker).__name__}."
        )


def _checked_layers(layers: object) -> tuple[str, ...]:
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
    return tuple(layers)


def _checked_heatmap_range(heatmap_range: object) -> tuple[float, float] | None:
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


def _check_probe(probe: object, input_fn: Picker | None, label_fn: Picker | None) -> None:
    """None (the validation data), a loader or dataset (read at fit start), or tensors checked
    now."""
    if isinstance(probe, (tuple, list, Mapping)):
        check_probe_tensors(*split_batch(probe, "`probe`", input_fn, label_fn))
    elif probe is not None and not isinstance(probe, (DataLoader, Dataset)):
        raise TypeError(
            "Expected `probe` to be a DataLoader, a Dataset, a tuple (inputs, labels) of tensors "
            f"or None (samples of the validation data), but got {type(probe).__name__}."
        )


def _check_probe_ids(ids: object, probe: object) -> None:
    """None, or (with a given probe) a sequence of str or int or an integer tensor ``(N,)``;
    N is checked at fit start."""
    if ids is None:
        return
    if probe is None:
        raise MisconfigurationException(
            "Expected `probe_ids` only with a given `probe` (samples chosen from the validation "
            "data have no ids you could give), but got probe=None."
        )
    if isinstance(ids, Tensor):
        ok = ids.ndim == 1 and not (ids.dtype.is_floating_point or ids.dtype.is_complex)
    else:
        ok = isinstance(ids, Sequence) and not isinstance(ids, str)
        ok = ok and (
            all(isinstance(i, str) for i in ids)
            or all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        )
    if not ok:
        raise TypeError(
            "Expected `probe_ids` to be None, a list of str, a list of int or an int tensor (N,), "
            f"but got {ids!r:.80}."
        )


def _checked_targets(targets: object) -> dict[str, ReferenceNetwork | Tensor]:
    """Named reference RSMs ``(N, N)`` (as float32 CPU tensors) and reference networks:
    ``(module, layer name)`` pairs or callables, computed at fit start."""
    if targets is None:
        return {}
    if not isinstance(targets, Mapping):
        raise TypeError(
            "Expected `targets` to be a mapping of name -> RSM tensor or reference network, "
            f"but got {type(targets).__name__}."
        )
    checked: dict[str, ReferenceNetwork | Tensor] = {}
    for name, target in targets.items():
        if not (isinstance(name, str) and name):
            raise TypeError(f"Expected `targets` keys to be non-empty str, but got {name!r}.")
        if isinstance(target, Tensor):
            checked[name] = _checked_target_rsm(name, target)
        elif _is_model_and_layer(target) or (callable(target) and not isinstance(target, tuple)):
            checked[name] = target
        else:
            raise TypeError(
                f"Expected `targets[{name!r}]` to be an RSM tensor (N, N), a (model, layer name) "
                f"pair or a callable returning features, but got {_describe(target)}."
            )
    return checked


def _is_model_and_layer(target: object) -> bool:
    return (
        isinstance(target, tuple)
        and len(target) == 2
        and isinstance(target[0], nn.Module)
        and isinstance(target[1], str)
    )


def _describe(target: object) -> str:
    if isinstance(target, tuple):
        return f"a tuple ({', '.join(type(item).__name__ for item in target)})"
    return type(target).__name__


def _checked_target_rsm(name: str, rsm: Tensor) -> Tensor:
    """A square matrix of finite values, as float32 on the CPU."""
    if rsm.ndim != 2 or rsm.shape[0] != rsm.shape[1]:
        raise ValueError(
            f"Expected `targets[{name!r}]` to be a square matrix (N, N), "
            f"but got shape {tuple(rsm.shape)}."
        )
    if not bool(rsm.isfinite().all()):
        raise ValueError(
            f"Expected `targets[{name!r}]` to hold finite values, but it has "
            f"{int((~rsm.isfinite()).sum())} NaN or Inf entries."
        )
    return rsm.detach().float().cpu()
