"""A reference network as an RSM target: its semantic RSM on the probe, computed once.

A target is a network whose representation of the probe a monitored layer is compared with
(a teacher, a pretrained model): ``(model, "layer4")`` names one of its modules, and a callable
``features = fn(inputs)`` returns features ``(B, ...)`` for a batch of probe inputs. Either way
:func:`reference_rsm` turns the features into concept vectors with the monitor's token and
pooling options and computes the semantic RSM with its kernel and matcher, so the target is
comparable with the monitored layers' RSMs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_rsm.callbacks.batches import (
    ForwardFn,
    ReferenceNetwork,
    batch_length,
    slice_batch,
)
from lightning_rsm.callbacks.probe import capture_layers, check_layer_names, untouched
from lightning_rsm.functional import semantic_rsm, to_concepts
from lightning_rsm.functional.options import DEFAULT_MAX_POSITIONS
from lightning_rsm.functional.representations import TokenGrid

__all__ = ["ReferenceNetwork", "reference_features", "reference_rsm"]


def reference_features(
    reference: ReferenceNetwork,
    inputs: Any,
    *,
    batch_size: int = 64,
    max_positions: int | None = DEFAULT_MAX_POSITIONS,
    forward_fn: ForwardFn | None = None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
) -> Tensor:
    """The reference network's concept vectors ``(N, S, C)`` for the probe inputs.

    The network runs without gradients, in eval mode, its modules' modes, its hooks and the
    torch, CUDA, Python and NumPy RNG states left as they were
    (:func:`~lightning_rsm.callbacks.probe.untouched`); inputs go batch by batch to the model's
    device.

    Args:
        reference: ``(model, layer)`` with ``layer`` a name from ``model.named_modules()``, or
            a callable mapping a batch of inputs to features ``(B, ...)`` (an ``nn.Module`` is
            put in eval mode for the call).
        inputs: the probe inputs: a tensor ``(N, ...)`` or a dict/tuple of such tensors.
        batch_size: samples per forward pass.
        max_positions: cap on the positions per sample (see ``to_concepts``).
        forward_fn: ``forward_fn(model, batch)`` runs a ``(model, layer)`` reference.
        special_tokens: leading special tokens of ``(N, T, D)`` features.
        tokens: ``"all"``, ``"patches"`` or ``"special"``.
        token_grid: how patch tokens are pooled (see ``to_concepts``).

    Returns:
        float32 tensor ``(N, S, C)``.

    Raises:
        TypeError: If ``reference`` is neither a ``(module, str)`` pair nor a callable.
        ValueError: If the layer is not a module of the model, or the features are not a
            representation of the N inputs.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        >>> reference_features((model, "1"), torch.rand(5, 1, 6, 6), max_positions=4).shape
        torch.Size([5, 4, 4])
    """
    options = {"special_tokens": special_tokens, "tokens": tokens, "token_grid": token_grid}
    if isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], nn.Module):
        model, layer = reference
        if not isinstance(layer, str):
            raise TypeError(f"Expected the reference's layer to be a str, but got {layer!r}.")
        check_layer_names(model, [layer])
        with untouched(model):
            features, _ = capture_layers(
                model,
                [layer],
                inputs,
                batch_size=batch_size,
                max_positions=max_positions,
                want_logits=False,
                forward_fn=forward_fn,
                **options,
            )
        return features[layer]
    if not callable(reference):
        raise TypeError(
            "Expected a reference network as `(model, layer_name)` or a callable returning "
            f"features, but got {type(reference).__name__}."
        )
    n = batch_length(inputs)
    parts = []
    with untouched(reference if isinstance(reference, nn.Module) else nn.Module()):
        if isinstance(reference, nn.Module):
            reference.eval()
        for start in range(0, n, batch_size):
            batch = slice_batch(inputs, start, start + batch_size)
            features = reference(batch)
            if not (isinstance(features, Tensor) and features.shape[:1] == (batch_length(batch),)):
                raise ValueError(
                    f"Expected the reference callable to return features of shape "
                    f"({batch_length(batch)}, ...) for a batch of {batch_length(batch)}, "
                    f"but got {getattr(features, 'shape', type(features).__name__)}."
                )
            concepts = to_concepts(
                features.detach().float(), max_positions=max_positions, name="reference", **options
            )
            parts.append(concepts.cpu())
    return torch.cat(parts)


def reference_rsm(
    reference: ReferenceNetwork,
    inputs: Any,
    *,
    kernel: str = "cosine",
    matcher: str = "exact",
    sigma: float | None = None,
    window: int = 8,
    tol: float = 1e-4,
    num_workers: int | None = None,
    batch_size: int = 64,
    max_positions: int | None = DEFAULT_MAX_POSITIONS,
    forward_fn: ForwardFn | None = None,
    special_tokens: int = 0,
    tokens: str = "all",
    token_grid: TokenGrid = None,
) -> Tensor:
    """The semantic RSM of a reference network on the probe, with the monitor's settings.

    Computed once (e.g. at fit start) and then compared with each evaluation's RSMs like a
    precomputed target. The options mean what they mean for
    :func:`~lightning_rsm.functional.semantic_rsm` and :func:`reference_features`.

    Returns:
        float32 symmetric tensor ``(N, N)`` on the CPU.

    Raises:
        TypeError, ValueError: As :func:`reference_features` and ``semantic_rsm``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        >>> rsm = reference_rsm((model, "1"), torch.rand(5, 1, 6, 6), max_positions=4)
        >>> rsm.shape, bool(torch.equal(rsm, rsm.T))
        (torch.Size([5, 5]), True)
    """
    features = reference_features(
        reference,
        inputs,
        batch_size=batch_size,
        max_positions=max_positions,
        forward_fn=forward_fn,
        special_tokens=special_tokens,
        tokens=tokens,
        token_grid=token_grid,
    )
    rsm = semantic_rsm(
        features,
        kernel=kernel,
        matcher=matcher,
        sigma=sigma,
        window=window,
        tol=tol,
        num_workers=num_workers,
    )
    return rsm.float().cpu()
