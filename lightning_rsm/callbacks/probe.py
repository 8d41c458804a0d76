"""The probe set and its forward pass: reading probe batches and capturing layer outputs.

Nothing here needs a Trainer: :func:`read_probe` turns what a user passes as a probe into
tensors once, and :func:`capture_layers` runs them through a model with forward hooks and
returns each layer's concept vectors ``(N, S, C)`` and the model's logits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_rsm.functional import to_concepts
from lightning_rsm.functional.options import check_labels

Probe = DataLoader | Dataset | tuple[Tensor, ...] | list[Tensor]


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


def split_batch(batch: Any, where: str) -> tuple[Tensor, Tensor | None]:
    """``(inputs, labels)`` from a tensor, or a tuple/list of one or two tensors.

    Raises:
        TypeError: If ``batch`` is anything else; ``where`` names it in the message.
    """
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


def check_probe_tensors(inputs: Tensor, labels: Tensor | None) -> None:
    """Raise unless there are at least 2 inputs and labels are class ids or multi-hot rows."""
    if inputs.ndim < 1 or inputs.shape[0] < 2:
        raise ValueError(
            "Expected the probe inputs to hold at least 2 samples along dim 0, "
            f"but got shape {tuple(inputs.shape)}."
        )
    if labels is not None:
        check_labels(labels, inputs.shape[0], "the {n} probe inputs")


def read_probe(probe: Probe, batch_size: int) -> tuple[Tensor, Tensor | None]:
    """Read a whole probe into memory: inputs ``(N, ...)`` and labels ``(N,)``/``(N, L)`` or None.

    Args:
        probe: a ``DataLoader`` or ``Dataset`` yielding tensors or ``(inputs, labels)`` tuples,
            or a tuple ``(inputs,)`` / ``(inputs, labels)`` of tensors.
        batch_size: batch size used to read a ``Dataset``.

    Returns:
        detached inputs and labels (labels on the CPU).

    Raises:
        TypeError: If a batch has another structure, or labels have a float dtype.
        ValueError: If the probe has fewer than 2 samples, or labels do not match the inputs.

    Example:
        >>> inputs, labels = read_probe((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])), 2)
        >>> inputs.shape, labels.tolist()
        (torch.Size([4, 3]), [0, 1, 0, 1])
    """
    if isinstance(probe, (tuple, list)):
        inputs, labels = split_batch(probe, "`probe`")
    else:
        loader = probe
        if not isinstance(loader, DataLoader):
            loader = DataLoader(loader, batch_size=batch_size, shuffle=False)
        parts = [split_batch(batch, "each probe batch") for batch in loader]
        if not parts:
            raise ValueError("Expected the probe to hold at least 2 samples, but it is empty.")
        inputs = torch.cat([x for x, _ in parts])
        has_labels = {y is not None for _, y in parts}
        if len(has_labels) != 1:
            raise ValueError("Expected every probe batch to have labels, or none to have them.")
        labels = torch.cat([y for _, y in parts]) if has_labels == {True} else None
    check_probe_tensors(inputs, labels)
    return inputs.detach(), None if labels is None else labels.detach().cpu()


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


def check_layer_names(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise ``ValueError`` listing the model's module names if a layer is not one of them."""
    modules = dict(model.named_modules())
    unknown = [layer for layer in layers if layer not in modules]
    if unknown:
        raise ValueError(
            f"Expected `layers` to be names from `model.named_modules()` of "
            f"{type(model).__name__}, but got {unknown}; the names are "
            f"{[name for name in modules if name]}."
        )


def _as_logits(output: Any, logits_fn: Callable[[Any], Tensor] | None, n: int) -> Tensor | None:
    """The ``(n, K)`` logits (K >= 2) of a forward output, or None if there are none."""
    logits = logits_fn(output) if logits_fn is not None else first_tensor(output)
    if not (isinstance(logits, Tensor) and logits.ndim == 2 and logits.shape[0] == n):
        return None
    return logits.detach().float().cpu() if logits.shape[1] >= 2 else None


def capture_layers(
    model: nn.Module,
    layers: Sequence[str],
    inputs: Tensor,
    *,
    batch_size: int,
    max_positions: int | None,
    logits_fn: Callable[[Any], Tensor] | None = None,
    want_logits: bool = True,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Run ``inputs`` through ``model`` in eval mode and capture the outputs of ``layers``.

    Each batch's layer outputs are pooled to ``max_positions`` as they are captured, so a large
    map is never held for the whole probe. Call it inside :func:`untouched` to leave the model
    as it was.

    Args:
        model: the network (its modules named as in ``model.named_modules()``).
        layers: module names; tuple outputs are reduced to their first tensor.
        inputs: probe inputs ``(N, ...)``; moved batch by batch to the model's device.
        batch_size: samples per forward pass.
        max_positions: cap on the positions per sample (see ``to_concepts``).
        logits_fn: maps the forward output to logits ``(B, K)``; default its first tensor.
        want_logits: collect logits at all.
        forward_context: a context around each forward call (e.g. a precision plugin's).

    Returns:
        concept vectors ``(N, S, C)`` per layer, and logits ``(N, K)`` or None when the output
        holds no logits.

    Raises:
        TypeError: If a layer's output holds no tensor.
        ValueError: If a layer's output is not a representation or has NaN/Inf, or a layer
            does not run exactly once per forward pass with the batch on dim 0.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 3))
        >>> features, logits = capture_layers(model, ["0"], torch.rand(5, 1, 6, 6),
        ...                                   batch_size=2, max_positions=4)
        >>> features["0"].shape, logits.shape
        (torch.Size([5, 4, 2]), torch.Size([5, 3]))
    """
    modules = dict(model.named_modules())
    captured: dict[str, list[Tensor]] = {layer: [] for layer in layers}

    def hook(layer: str) -> Callable[..., None]:
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            x = first_tensor(output)
            if x is None:
                raise TypeError(
                    f"Expected layer {layer!r} to output a tensor or a tuple holding one, "
                    f"but got {type(output).__name__}."
                )
            captured[layer].append(to_concepts(x.detach().float(), max_positions=max_positions,
                                               name=layer))  # fmt: skip

        return capture

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in layers]
    device = next((p.device for p in model.parameters()), inputs.device)
    logits_parts: list[Tensor] | None = [] if want_logits else None
    model.eval()
    try:
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start : start + batch_size].to(device)
            with forward_context():
                output = model(batch)
            _check_one_call_per_sample(captured, start, batch.shape[0])
            if logits_parts is not None:
                logits = _as_logits(output, logits_fn, batch.shape[0])
                logits_parts = None if logits is None else [*logits_parts, logits]
    finally:
        for handle in handles:
            handle.remove()
    features = {layer: torch.cat(parts) for layer, parts in captured.items()}
    return features, None if logits_parts is None else torch.cat(logits_parts)


def _check_one_call_per_sample(captured: dict[str, list[Tensor]], start: int, n: int) -> None:
    for layer, parts in captured.items():
        calls = sum(len(part) for part in parts) - start
        if calls != n:
            raise ValueError(
                f"Expected layer {layer!r} to output {n} samples along dim 0 in a forward pass "
                f"of {n}, but got {calls} (a module that does not run, runs repeatedly or is "
                "not batch-first)."
            )
