"""The probe set and its forward pass: reading probe batches and capturing layer outputs.

Nothing here needs a Trainer: :func:`read_probe` turns what a user passes as a probe into
tensors once, and :func:`capture_layers` runs them through a model with forward hooks and
returns each layer's concept vectors ``(N, S, C)`` and the model's logits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_rsm.callbacks.batches import (
    ForwardFn,
    Picker,
    batch_length,
    call_model,
    concat_batches,
    describe,
    leaves,
    map_batch,
    move_batch,
    slice_batch,
    split_batch,
)
from lightning_rsm.functional import to_concepts
from lightning_rsm.functional.options import check_labels
from lightning_rsm.functional.representations import TokenGrid, describe_token_pooling

Probe = DataLoader | Dataset | tuple[Tensor, ...] | list[Tensor] | Mapping[str, Any]


class ProbeData(NamedTuple):
    """The probe as read once at fit start: ``inputs`` (a tensor ``(N, ...)``, or a dict/tuple
    of them, as fed to the model) and ``labels`` (``(N,)`` class ids, ``(N, L)`` multi-hot, or
    None), both detached."""

    inputs: Any
    labels: Tensor | None


def first_tensor(output: Any) -> Tensor | None:
    """The output itself if it is a tensor, else the first tensor in a tuple, list or mapping.

    Example:
        >>> first_tensor((None, torch.ones(1)))
        tensor([1.])
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((item for item in output if isinstance(item, Tensor)), None)
    return None


def check_probe_tensors(inputs: Any, labels: Tensor | None) -> None:
    """Raise unless there are at least 2 inputs and labels are class ids or multi-hot rows."""
    n = batch_length(inputs)
    if n < 2:
        shapes = [tuple(leaf.shape) for leaf in leaves(inputs)]
        raise ValueError(
            "Expected the probe inputs to hold at least 2 samples along dim 0, "
            f"but got shape {shapes[0] if len(shapes) == 1 else shapes}."
        )
    if labels is not None:
        check_labels(labels, n, "the {n} probe inputs")


def check_targets_match_probe(targets: Mapping[str, Tensor], n: int) -> None:
    """Raise ``ValueError`` unless every target RSM is ``(n, n)`` like the probe."""
    for name, rsm in targets.items():
        if rsm.shape[0] != n:
            raise ValueError(
                f"Expected `targets[{name!r}]` to have shape ({n}, {n}) like the probe, "
                f"but got shape {tuple(rsm.shape)}."
            )


def read_probe(
    probe: Probe,
    batch_size: int,
    input_fn: Picker | None = None,
    label_fn: Picker | None = None,
) -> tuple[Any, Tensor | None]:
    """Read a whole probe into memory: inputs ``(N, ...)`` and labels ``(N,)``/``(N, L)`` or None.

    Args:
        probe: a ``DataLoader`` or ``Dataset`` yielding batches, or the whole probe as one batch
            (a tuple ``(inputs,)`` / ``(inputs, labels)`` of tensors, or a dict).
        batch_size: batch size used to read a ``Dataset``.
        input_fn: picks the model's inputs from a batch (see :func:`split_batch`).
        label_fn: picks the labels from a batch (see :func:`split_batch`).

    Returns:
        detached inputs (a tensor, or a dict/tuple of tensors) and labels (on the CPU).

    Raises:
        TypeError: If a batch has another structure, or labels have a float dtype.
        ValueError: If the probe has fewer than 2 samples, or labels do not match the inputs.

    Example:
        >>> inputs, labels = read_probe((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])), 2)
        >>> inputs.shape, labels.tolist()
        (torch.Size([4, 3]), [0, 1, 0, 1])
    """
    if isinstance(probe, (tuple, list, Mapping)):
        inputs, labels = split_batch(probe, "`probe`", input_fn, label_fn)
    else:
        loader = probe
        if not isinstance(loader, DataLoader):
            loader = DataLoader(loader, batch_size=batch_size, shuffle=False)
        parts = [split_batch(batch, "each probe batch", input_fn, label_fn) for batch in loader]
        if not parts:
            raise ValueError("Expected the probe to hold at least 2 samples, but it is empty.")
        inputs = concat_batches([x for x, _ in parts])
        has_labels = {y is not None for _, y in parts}
        if len(has_labels) != 1:
            raise ValueError("Expected every probe batch to have labels, or none to have them.")
        labels = torch.cat([y for _, y in parts]) if has_labels == {True} else None
    check_probe_tensors(inputs, labels)
    return map_batch(inputs, Tensor.detach), None if labels is None else labels.detach().cpu()


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a block without gradients and restore RNG states and every submodule's mode.

    Example:
        >>> model = torch.nn.Dropout()
        >>> with untouched(model):
        ...     _ = model.eval()
        >>> model.training
        True
    """
    modes = [(module, module.training) for module in model.modules()]
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


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by name; inside ``torch.compile``'d modules also without ``_orig_mod.``.

    ``torch.compile(net)`` wraps ``net`` in an ``OptimizedModule`` whose modules are named
    ``_orig_mod.<name>``; a layer is also found by the name it has in ``net`` itself.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> model = torch.nn.ModuleDict({"net": torch.compile(net)})
        >>> named_layers(model)["net.0"] is named_layers(model)["net._orig_mod.0"] is net[0]
        True
    """
    modules = {}
    for name, module in model.named_modules():
        short = ".".join(part for part in name.split(".") if part != "_orig_mod")
        modules.setdefault(short, module)
        modules.setdefault(name, module)
    return modules


def check_layer_names(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the model's module names if a layer is not one of them."""
    modules = named_layers(model)
    unknown = [layer for layer in layers if layer not in modules]
    if unknown:
        raise ValueError(
            f"Expected `layers` to be names from `model.named_modules()` of "
            f"{type(model).__name__}, but got {unknown}; the names are "
            f"{[name for name in modules if name and '_orig_mod' not in name.split('.')]}."
        )


def _as_logits(output: Any, logits_fn: Callable[[Any], Tensor] | None, n: int) -> Tensor | None:
    """The ``(n, K)`` logits (K >= 2) of a forward output, or None if there are none."""
    logits = logits_fn(output) if logits_fn is not None else first_tensor(output)
    if not (isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[0] == n):
        return None
    return logits.detach().float().cpu() if logits.shape[1] >= 2 else None


def eager() -> AbstractContextManager:
    """A context in which ``torch.compile``'d code runs eagerly, without compiling anything.

    The probe forward runs in it, so forward hooks run as plain Python and the training graph
    is neither traced with them nor recompiled (``torch.compiler.set_stance("force_eager")``;
    a no-op on torch versions without it).

    Example:
        >>> compiled = torch.compile(torch.nn.Linear(2, 2))
        >>> with eager():
        ...     compiled(torch.zeros(1, 2)).shape             # runs without compiling
        torch.Size([1, 2])
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def capture_layers(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Any,
    *,
    batch_size: int,
    max_positions: int | None,
    logits_fn: Callable[[Any], Tensor] | None = None,
    want_logits: bool = True,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    forward_fn: ForwardFn | None = None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
    warn: Callable[[str], Any] | None = None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Run ``inputs`` through ``model`` in eval mode and capture the outputs of ``layers``.

    Each batch's layer outputs are pooled to ``max_positions`` as they are captured, so a large
    map is never held for the whole probe. The forward runs eagerly, also for a model that
    ``torch.compile`` wrapped (see :func:`eager`). Call it inside :func:`untouched` to leave
    the model as it was.

    Args:
        model: the network (its modules named as in ``model.named_modules()``, or as in
            :func:`named_layers`).
        layers: module names; tuple outputs are reduced to their first tensor.
        inputs: probe inputs: a tensor ``(N, ...)`` or a dict/tuple of such tensors; moved
            batch by batch to the model's device.
        batch_size: samples per forward pass.
        max_positions: cap on the positions per sample (see ``to_concepts``).
        logits_fn: maps the forward output to logits ``(B, K)``; default its first tensor.
        want_logits: collect logits at all.
        forward_context: a context around each forward call (e.g. a precision plugin's).
        forward_fn: ``forward_fn(model, batch)`` runs the model; default :func:`call_model`.
        special_tokens: leading special tokens of ``(N, T, D)`` layers (see ``to_concepts``).
        tokens: ``"all"``, ``"patches"`` or ``"special"`` (see ``to_concepts``).
        token_grid: how patch tokens are pooled (see ``to_concepts``).
        warn: called with a sentence on each token layer that is pooled (once per batch).

    Returns:
        concept vectors ``(N, S, C)`` per layer, and logits ``(N, K)`` or None when the output
        holds no logits.

    Raises:
        TypeError: If a layer's output holds no tensor.
        ValueError: If a layer's output is not a representation or has NaN/Inf, or a layer
            does not run exactly once per forward pass with the batch on dim 0.
        RuntimeError: If the forward itself fails; the message says how the model was called
            and which option changes that.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3))
        >>> features, logits = capture_layers(model, ["0"], torch.rand(5, 1, 6, 6),
        ...                                   batch_size=2, max_positions=4)
        >>> features["0"].shape, logits.shape
        (torch.Size([5, 4, 2]), torch.Size([5, 3]))
    """
    modules = named_layers(model)
    captured: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    options = {"special_tokens": special_tokens, "tokens": tokens, "token_grid": token_grid}
    hook_errors: list[BaseException] = []

    def hook(layer: str) -> Callable[..., None]:
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            try:
                x = first_tensor(output)
                if x is None:
                    raise TypeError(
                        f"Expected layer {layer!r} to output a tensor or a tuple holding one, "
                        f"but got {type(output).__name__}."
                    )
                if warn is not None and x.ndim == 3:
                    pooling = describe_token_pooling(
                        x.shape[1], max_positions, name=layer, **options
                    )
                    if pooling is not None:
                        warn(pooling)
                captured[layer].append(
                    to_concepts(
                        x.detach().float(), max_positions=max_positions, name=layer, **options
                    )
                )
            except Exception as error:
                hook_errors.append(error)
                raise

        return capture

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
    device = next((p.device for p in model.parameters()), leaves(inputs)[0].device)
    logits_parts: list[Tensor] | None = [] if want_logits else None
    model.eval()
    try:
        n = batch_length(inputs)
        for start in range(0, n, batch_size):
            batch = move_batch(slice_batch(inputs, start, start + batch_size), device)
            output = _forward(model, batch, forward_fn, forward_context, hook_errors)
            size = batch_length(batch)
            _check_one_call_per_sample(captured, start, size)
            if logits_parts is not None:
                logits = _as_logits(output, logits_fn, size)
                logits_parts = None if logits is None else [*logits_parts, logits]
    finally:
        for handle in handles:
            handle.remove()
    features = {layer: torch.cat(parts) for layer, parts in captured.items()}
    return features, None if logits_parts is None else torch.cat(logits_parts)


def _forward(
    model: nn.Module,
    batch: Any,
    forward_fn: ForwardFn | None,
    forward_context: Callable[[], AbstractContextManager],
    hook_errors: list[BaseException],
) -> Any:
    """One eager forward pass; a failure of the model (not of a hook) says how it was called."""
    try:
        with forward_context(), eager():
            return (forward_fn or call_model)(model, batch)
    except Exception as error:
        if error in hook_errors:
            raise
        first_line = next(iter(str(error).strip().splitlines()), "")
        how = (
            "`forward_fn(model, inputs)`"
            if forward_fn is not None
            else ("`model(**inputs)`" if isinstance(batch, Mapping) else "`model(inputs)`")
        )
        raise RuntimeError(
            f"Expected the probe forward {how} to run on inputs that are {describe(batch)}, but "
            f"it raised {type(error).__name__}: {first_line}. Pass `forward_fn=lambda model, "
            "inputs: ...` to call the model another way, or `input_fn` to pick other inputs."
        ) from error


def _check_one_call_per_sample(captured: dict[str, list[Tensor]], start: int, n: int) -> None:
    for layer, parts in captured.items():
        calls = sum(len(part) for part in parts) - start
        if calls != n:
            raise ValueError(
                f"Expected layer {layer!r} to output {n} samples along dim 0 in a forward pass "
                f"of {n}, but got {calls} (a module that does not run, runs repeatedly or is "
                "not batch-first)."
            )
