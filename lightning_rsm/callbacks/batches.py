"""The structure of a batch: what to feed the model, what the labels are, and how to call it.

A batch may be a tensor, a tuple or list, or a dict (HuggingFace style); ``input_fn`` and
``label_fn`` pick the inputs and labels (a key, an index or a function), and inputs may
themselves be a tensor, a tuple or a dict of tensors. The helpers here slice, index, join and
move such inputs as one, and call the model with them (``model(**inputs)`` for a dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

#: Picks a part of a batch: a function of the batch, an index (tuple batches) or a key (dict
#: batches). The function comes first so that LightningCLI (jsonargparse) resolves an import
#: path such as ``mymodule.pick`` to the function rather than keeping it as a key.
Picker = Callable[[Any], Any] | int | str

#: Runs the model on a probe batch's inputs: ``forward_fn(model, inputs) -> output``.
ForwardFn = Callable[[nn.Module, Any], Any]

#: Maps the model's output to logits ``(B, K)``. Typed ``-> Any`` so that LightningCLI accepts
#: an unannotated function by import path (``-> Tensor`` would demand the annotation).
LogitsFn = Callable[[Any], Any]

#: Maps the probe's inputs to images ``(N, 1 | 3, H, W)`` for the neighbours figure; typed
#: ``-> Any`` for LightningCLI like ``LogitsFn``.
ImageFn = Callable[[Any], Any]

#: A reference network: ``(model, layer name)``, or a function from probe inputs to features.
ReferenceNetwork = Callable[[Any], Tensor] | tuple[nn.Module, str]


def describe(batch: Any) -> str:
    """A one-line description of a batch's structure, for error messages.

    Example:
        >>> describe({"pixel_values": torch.zeros(2, 3), "labels": torch.zeros(2)})
        "a dict with keys ['pixel_values', 'labels']"
        >>> describe((torch.zeros(2), torch.zeros(2), "meta"))
        'a tuple of length 3 (Tensor, Tensor, str)'
    """
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {list(batch)}"
    if isinstance(batch, (tuple, list)):
        items = ", ".join(type(item).__name__ for item in batch[:6])
        more = ", ..." if len(batch) > 6 else ""
        return f"a {type(batch).__name__} of length {len(batch)} ({items}{more})"
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    return f"a {type(batch).__name__}"


def _pick(batch: Any, picker: Picker, option: str) -> Any:
    """The part of ``batch`` that ``picker`` names; ``option`` names the picker in errors."""
    if callable(picker):
        return picker(batch)
    if isinstance(batch, Mapping) and isinstance(picker, str) and picker in batch:
        return batch[picker]
    if (
        isinstance(batch, (tuple, list))
        and isinstance(picker, int)
        and not isinstance(picker, bool)
        and -len(batch) <= picker < len(batch)
    ):
        return batch[picker]
    raise TypeError(
        f"Expected `{option}={picker!r}` to be a key or an index of each probe batch, "
        f"but got {describe(batch)}."
    )


def split_batch(
    batch: Any,
    where: str,
    input_fn: Picker | None = None,
    label_fn: Picker | None = None,
) -> tuple[Any, Tensor | None]:
    """``(inputs, labels)`` of one batch: by default from a tensor or a tuple of one or two.

    Args:
        batch: what a probe loader yields (or the whole probe as one batch).
        where: how messages name ``batch``.
        input_fn: a key (dict batches), an index (tuple batches) or a function of the batch
            that gives the model's inputs: a tensor ``(B, ...)`` or a dict/tuple of such
            tensors. Default: the batch if it is a tensor, else the first of one or two tensors.
        label_fn: the same for the labels ``(B,)`` or ``(B, L)``; default: the second tensor of
            an ``(inputs, labels)`` pair, else none.

    Raises:
        TypeError: If the batch has another structure than the pickers expect; the message
            names the structure and the option that fixes it.

    Example:
        >>> batch = {"pixel_values": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}
        >>> inputs, labels = split_batch(batch, "a batch", "pixel_values", "labels")
        >>> inputs.shape, labels.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    pair = (
        isinstance(batch, (tuple, list))
        and len(batch) in (1, 2)
        and all(isinstance(item, Tensor) for item in batch)
    )
    if input_fn is None:
        if isinstance(batch, Tensor):
            inputs = batch
        elif pair:
            inputs = batch[0]
        else:
            raise TypeError(
                f"Expected {where} to be a tensor or a tuple (inputs, labels) of tensors, but "
                f"got {describe(batch)}; pass `input_fn` and `label_fn` (a key, an index or a "
                "function of the batch) to pick the inputs and the labels."
            )
    else:
        inputs = _pick(batch, input_fn, "input_fn")
    if label_fn is None:
        labels = batch[1] if pair and len(batch) == 2 else None
    else:
        labels = _pick(batch, label_fn, "label_fn")
    _check_inputs(inputs, batch)
    if labels is not None and not isinstance(labels, Tensor):
        raise TypeError(
            f"Expected `label_fn` to give a tensor of labels, but got {type(labels).__name__} "
            f"from {describe(batch)}."
        )
    return inputs, labels


def _check_inputs(inputs: Any, batch: Any) -> None:
    tensors = leaves(inputs)
    if not tensors or not all(isinstance(leaf, Tensor) and leaf.ndim >= 1 for leaf in tensors):
        raise TypeError(
            "Expected the probe inputs to be a tensor (B, ...) or a dict/tuple of such tensors, "
            f"but got {describe(inputs)} from {describe(batch)}; pass `input_fn` to pick them."
        )
    sizes = {leaf.shape[0] for leaf in tensors}
    if len(sizes) != 1:
        raise ValueError(
            "Expected the probe input tensors to share their size along dim 0, but got "
            f"sizes {sorted(sizes)} in {describe(inputs)}."
        )


# ------------------------------------------------------------------ batch-first trees
# Inputs are a tensor (B, ...) or a dict/tuple/list of such tensors (keyword or positional
# arguments of a model); these helpers treat every tensor in them alike along dim 0.


def leaves(tree: Any) -> list[Any]:
    """Every leaf of a tensor, or of a (nested) tuple, list or dict of them, in order.

    Example:
        >>> [leaf.shape for leaf in leaves({"a": torch.zeros(2), "b": (torch.zeros(3),)})]
        [torch.Size([2]), torch.Size([3])]
    """
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for value in tree for leaf in leaves(value)]
    return [tree]


def map_batch(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The same structure with ``fn`` applied to every tensor (``apply_to_collection``).

    Example:
        >>> map_batch({"a": torch.ones(2)}, lambda t: 2 * t)
        {'a': tensor([2., 2.])}
    """
    return apply_to_collection(tree, Tensor, fn)


def batch_length(inputs: Any) -> int:
    """Samples in ``inputs``: the size along dim 0 of its (first) tensor.

    Example:
        >>> batch_length({"input_ids": torch.zeros(3, 7), "mask": torch.ones(3, 7)})
        3
    """
    return int(leaves(inputs)[0].shape[0])


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor in ``inputs``.

    Example:
        >>> slice_batch((torch.arange(4), torch.arange(4) * 2), 1, 3)
        (tensor([1, 2]), tensor([2, 4]))
    """
    return map_batch(inputs, lambda x: x[start:stop])


def index_batch(inputs: Any, index: Tensor) -> Any:
    """Samples ``index`` (a 1-D long tensor) of every tensor in ``inputs``.

    Example:
        >>> index_batch({"x": torch.arange(4)}, torch.tensor([3, 0]))
        {'x': tensor([3, 0])}
    """
    return map_batch(inputs, lambda x: x[index.to(x.device)])


def concat_batches(parts: Sequence[Any]) -> Any:
    """One tree from batches of the same structure, concatenated along dim 0.

    Example:
        >>> concat_batches([{"x": torch.zeros(2)}, {"x": torch.ones(1)}])
        {'x': tensor([0., 0., 1.])}
    """
    first = parts[0]
    if isinstance(first, Mapping):
        return {key: concat_batches([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([part[i] for part in parts]) for i in range(len(first)))
    return torch.cat(list(parts))


def move_batch(inputs: Any, device: torch.device) -> Any:
    """Every tensor in ``inputs`` on ``device`` (detached).

    Example:
        >>> move_batch({"x": torch.ones(2, requires_grad=True)}, torch.device("cpu"))
        {'x': tensor([1., 1.])}
    """
    return map_batch(inputs, lambda x: x.detach().to(device))


def call_model(model: nn.Module, inputs: Any) -> Any:
    """The default ``forward_fn``: ``model(**inputs)`` for a dict, else ``model(inputs)``.

    Example:
        >>> call_model(torch.nn.Identity(), torch.ones(1))
        tensor([1.])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)
