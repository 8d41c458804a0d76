"""When ``RSMMonitor`` evaluates and when it waits for a background evaluation.

An evaluation runs every ``every_n_epochs`` epochs (after the epoch's validation, or after the
training epoch when no validation ends it) or every ``every_n_train_steps`` optimizer steps
(after the step, in ``on_train_batch_end``). Callbacks that monitor an ``rsm/`` key
(``ModelCheckpoint``, ``EarlyStopping``) are met through public API only: the latest scores
stay in ``trainer.callback_metrics`` (:mod:`lightning_rsm.callbacks.reporting`), so such a
callback finds the key from the first evaluation on, whatever its own schedule; before it,
Lightning's own error or warning about a missing key applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_rsm.callbacks.config import MonitorConfig
from lightning_rsm.namespaces import MisconfigurationException, is_fitting

if TYPE_CHECKING:  # annotations only: the module serves lightning.pytorch too
    import pytorch_lightning as pl


def is_due(
    config: MonitorConfig, trainer: pl.Trainer, *, after_step: bool, last_epoch: int, last_step: int
) -> bool:
    """Whether to evaluate now: after a step (``on_train_batch_end``) or an epoch.

    A step is counted once, also when several batches accumulate into it.
    """
    if config.every_n_train_steps is not None:
        step = trainer.global_step
        return (
            after_step and step > 0 and step != last_step and not step % config.every_n_train_steps
        )
    epoch = trainer.current_epoch
    return not after_step and epoch != last_epoch and not (epoch + 1) % config.every_n_epochs


def validation_ends_the_epoch(trainer: pl.Trainer) -> bool:
    """A validation run at the end of a training epoch of ``fit`` (not the sanity check)."""
    return (
        not trainer.sanity_checking
        and is_fitting(trainer)
        and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    )


def ends_fit(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` stops after this epoch as far as is known in its epoch-end hooks:
    ``max_epochs`` or ``max_steps`` reached, or ``trainer.should_stop`` set."""
    max_epochs = trainer.max_epochs
    return bool(
        trainer.should_stop
        or (max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1)
        or (0 <= trainer.max_steps <= trainer.global_step)
    )


def monitored_keys(trainer: pl.Trainer) -> list[str]:
    """The ``rsm/`` keys that callbacks monitor (their public ``monitor`` attribute)."""
    keys = (getattr(callback, "monitor", None) for callback in trainer.callbacks)
    return [key for key in keys if isinstance(key, str) and key.startswith("rsm/")]


def misses_monitored_key(trainer: pl.Trainer) -> bool:
    """Whether a callback monitors an ``rsm/`` key not yet in ``trainer.callback_metrics``."""
    return any(key not in trainer.callback_metrics for key in monitored_keys(trainer))


def check_score_readers(config: MonitorConfig, trainer: pl.Trainer) -> None:
    """Raise at fit start if a callback monitors an ``rsm/`` key that cannot be right: with
    ``background=True`` and ``every_n_train_steps`` the scores of a step arrive at a later
    batch, so a reader would pair a checkpoint or a stop with an earlier step's score.

    Raises:
        MisconfigurationException: naming the key and the setting that fixes it.
    """
    keys = monitored_keys(trainer)
    if not (keys and config.background and config.by_steps):
        return
    n = config.every_n_train_steps
    raise MisconfigurationException(
        f"Expected a callback monitoring {keys[0]!r} to read it when `RSMMonitor` logs it, but "
        f"`RSMMonitor(every_n_train_steps={n}, background=True)` logs the scores of a step at a "
        "later training batch, when the worker has finished, so it would read an earlier step's "
        f"score: pass `RSMMonitor(every_n_train_steps={n}, background=False)`, or evaluate per "
        "epoch (`every_n_epochs`), where background scores reach it at epoch ends."
    )
