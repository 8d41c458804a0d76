"""Steps that every rank runs and that either work on every rank or are skipped on every rank.

Under DDP a monitoring step that fails on one rank (out of memory, NaN features in one rank's
forward) must not leave the others waiting in the next collective: after each step the ranks
exchange whether it worked, and all of them see the same failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from lightning_rsm.functional.distributed import first_failure

T = TypeVar("T")


def run_on_every_rank(
    step: Callable[[], T], *, distributed: bool | dist.ProcessGroup
) -> tuple[T | None, tuple[int, str] | None]:
    """Run ``step``; ``(result, None)`` if it worked on every rank, else ``(None, (rank, why))``.

    The failure is the same on every rank: the first failing rank and its error as text. With
    ``distributed=True`` every rank of the default process group must call it (it gathers one
    small object per rank); with a ``ProcessGroup``, every rank of that group, and the gather
    runs in it (a worker thread beside training uses a group of its own); without, the rank
    is 0.

    Example:
        >>> run_on_every_rank(lambda: 1 / 0, distributed=False)
        (None, (0, 'ZeroDivisionError: division by zero'))
        >>> run_on_every_rank(lambda: 2, distributed=False)
        (2, None)
    """
    result, message = None, None
    try:
        result = step()
    except Exception as error:  # a fault in monitoring must not stop training
        message = f"{type(error).__name__}: {error}"
    if distributed:
        failure = first_failure(message, None if isinstance(distributed, bool) else distributed)
    else:
        failure = None if message is None else (0, message)
    return (result, None) if failure is None else (None, failure)


def is_distributed(trainer: Any) -> bool:
    """Whether the Trainer runs several processes in an initialised process group."""
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
