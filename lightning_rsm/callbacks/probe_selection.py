"""A probe taken from the fit's own validation data, for ``RSMMonitor(probe=None)``.

The samples are chosen from the validation loader's dataset with a fixed seed (a generator of
their own: the global RNG is not touched), class-balanced when the batches hold class ids, and
read once. The same data gives the same probe in every run, on every rank and after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_rsm.callbacks.batches import (
    Picker,
    batch_length,
    concat_batches,
    index_batch,
    split_batch,
)
from lightning_rsm.callbacks.probe import read_probe
from lightning_rsm.namespaces import MisconfigurationException

if TYPE_CHECKING:  # annotations only: the module serves lightning.pytorch too
    import pytorch_lightning as pl

#: The seed of the generator that chooses the probe samples.
SEED = 0

#: Candidates read per probe sample, among which the class-balanced choice is made.
OVERSAMPLE = 4


def validation_loader(trainer: pl.Trainer) -> DataLoader:
    """The fit's (first) validation loader: the one the fit set up, else the datamodule's.

    Raises:
        MisconfigurationException: If the fit has no validation data.
    """
    loaders: Any = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        try:
            loaders = trainer.datamodule.val_dataloader()
        except Exception:  # a datamodule without val_dataloader raises
            loaders = None
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, Sequence):
        loaders = loaders[0] if loaders else None
    if not isinstance(loaders, DataLoader):
        raise MisconfigurationException(
            "Expected validation data for `RSMMonitor(probe=None)` (a `validation_step` with "
            "`val_dataloaders` or a datamodule's `val_dataloader`), but the fit has none: pass "
            "`probe`, or validation data to `fit`."
        )
    return loaders


def select_probe(
    loader: DataLoader,
    probe_size: int,
    batch_size: int,
    input_fn: Picker | None = None,
    label_fn: Picker | None = None,
) -> tuple[Any, Tensor | None]:
    """``probe_size`` samples of ``loader``'s data, class-balanced, chosen with a fixed seed.

    A map-style dataset is sampled at random (``torch.randperm`` with its own generator seeded
    with :data:`SEED`): up to ``OVERSAMPLE * probe_size`` candidates are read for their labels,
    and classes take turns (in their sorted order) to give a sample until ``probe_size`` are
    chosen; then only the chosen samples are read for the probe, in dataset order. The loader's
    sampler (shuffling, a distributed sampler) is not used, only its dataset and ``collate_fn``.
    An iterable dataset gives its first candidates in the loader's order. Without labels, or
    with multi-hot labels, the first candidates are taken.

    Args:
        loader: the validation loader.
        probe_size: samples to take (all of them if the data has fewer).
        batch_size: samples per batch while reading.
        input_fn: picks the model's inputs from a batch (see ``split_batch``).
        label_fn: picks the labels from a batch (see ``split_batch``).

    Returns:
        inputs ``(N, ...)`` (a tensor or a dict/tuple of tensors) and labels or None.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> x, y = torch.arange(40.0).unsqueeze(1), torch.arange(40) % 4
        >>> inputs, labels = select_probe(DataLoader(TensorDataset(x, y)), 8, 16)
        >>> torch.bincount(labels).tolist()
        [2, 2, 2, 2]
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        inputs, labels = _first_samples(loader, OVERSAMPLE * probe_size, input_fn, label_fn)
        chosen = _balanced(labels, probe_size, batch_length(inputs))
        return index_batch(inputs, chosen), None if labels is None else labels[chosen]
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(dataset), generator=generator)[: OVERSAMPLE * probe_size]
    labels = _read(loader, order, batch_size, input_fn, label_fn, labels_only=True)[1]
    chosen = order[_balanced(labels, probe_size, len(order))].sort().values
    return _read(loader, chosen, batch_size, input_fn, label_fn)


def _read(
    loader: DataLoader,
    indices: Tensor,
    batch_size: int,
    input_fn: Picker | None,
    label_fn: Picker | None,
    *,
    labels_only: bool = False,
) -> tuple[Any, Tensor | None]:
    """Inputs and labels of the dataset's samples ``indices``, in that order."""
    subset = DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
    )
    if not labels_only:
        return read_probe(subset, batch_size, input_fn, label_fn)
    labels = [
        split_batch(batch, "each validation batch", input_fn, label_fn)[1] for batch in subset
    ]
    return None, None if any(y is None for y in labels) else torch.cat(labels).cpu()


def _first_samples(
    loader: DataLoader, count: int, input_fn: Picker | None, label_fn: Picker | None
) -> tuple[Any, Tensor | None]:
    parts, seen = [], 0
    for batch in loader:
        parts.append(split_batch(batch, "each validation batch", input_fn, label_fn))
        seen += batch_length(parts[-1][0])
        if seen >= count:
            break
    if not parts:
        raise ValueError("Expected the validation data to hold samples, but it is empty.")
    inputs = concat_batches([x for x, _ in parts])
    labels = None if any(y is None for _, y in parts) else torch.cat([y for _, y in parts]).cpu()
    return inputs, labels


def _balanced(labels: Tensor | None, count: int, n: int) -> Tensor:
    """Positions of ``count`` of ``n`` samples in which classes take turns (without class ids:
    the first ones).

    Example:
        >>> _balanced(torch.tensor([0, 0, 0, 1, 2, 0]), 4, 6).tolist()
        [0, 1, 3, 4]
    """
    if labels is None or labels.ndim != 1:
        return torch.arange(min(n, count))
    queues = [(labels == c).nonzero().flatten().tolist() for c in labels.unique().tolist()]
    chosen: list[int] = []
    for turn in range(max(len(queue) for queue in queues)):
        chosen.extend(queue[turn] for queue in queues if turn < len(queue))
        if len(chosen) >= count:
            break
    return torch.tensor(sorted(chosen[:count]), dtype=torch.long)
