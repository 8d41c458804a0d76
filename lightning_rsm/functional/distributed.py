"""What the ranks of a process group tell each other: their share of the work, whether any failed,
and the sum of their partial results. Used by ``semantic_rsm(distributed=...)`` and the monitor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_of(distributed: bool | dist.ProcessGroup) -> tuple[int, int]:
    """(rank, world size) to split the blocks over; (0, 1) when not splitting."""
    if not distributed:
        return 0, 1
    if isinstance(distributed, dist.ProcessGroup):
        return dist.get_rank(distributed), dist.get_world_size(distributed)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "Expected an initialised torch.distributed process group with "
            "`distributed=True`, but none is initialised."
        )
    return dist.get_rank(), dist.get_world_size()


def first_failure(
    message: str | None, group: dist.ProcessGroup | None = None
) -> tuple[int, str] | None:
    """Collective: each rank of ``group`` passes its failure as text (None if it worked); every
    rank gets the same answer, the first failing rank and its text, or None.

    Example:
        >>> import tempfile, torch.distributed as dist
        >>> folder = tempfile.TemporaryDirectory()
        >>> dist.init_process_group("gloo", init_method=f"file://{folder.name}/pg", rank=0,
        ...                         world_size=1)
        >>> first_failure(None), first_failure("MemoryError: out of memory")
        (None, (0, 'MemoryError: out of memory'))
        >>> dist.destroy_process_group()
        >>> folder.cleanup()
    """
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    return next(((rank, text) for rank, text in enumerate(messages) if text is not None), None)


def raise_if_any_rank_failed(
    error: BaseException | None, group: dist.ProcessGroup | None = None
) -> None:
    """Collective: every rank learns whether any rank failed, and all of them raise if so.

    Without it, a rank that fails while solving its blocks would leave the others waiting in
    the all-reduce that gathers the result.
    """
    failure = first_failure(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    if failure is not None:
        rank, text = failure
        raise RuntimeError(f"semantic_rsm failed on rank {rank} ({text}); every rank stops.")


def sum_across_ranks(*tensors: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce in place; every entry was filled by exactly one rank, the rest hold zeros."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    for tensor in tensors:
        if device is None or tensor.device == device:
            dist.all_reduce(tensor, group=group)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, group=group)
            tensor.copy_(moved)
