"""When ``RSMMonitor`` evaluates, how its scores are logged, and whether the callbacks that read
them (``ModelCheckpoint``, ``EarlyStopping``) look for them at times when they exist.

An evaluation runs every ``every_n_epochs`` epochs (after the epoch's validation, or after the
training epoch) or every ``every_n_train_steps`` optimizer steps (after the step, in
``on_train_batch_end``). A callback that monitors an ``rsm/`` key at other times finds it missing
(``ModelCheckpoint`` and a strict ``EarlyStopping`` then stop the fit with an error) or stale;
:func:`check_score_readers` finds such a callback before the first training step and names the
setting that fixes it (with ``background=True`` a step schedule allows no such callback: its
scores arrive at a later batch).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from lightning_rsm.callbacks.validation import as_misconfiguration
from lightning_rsm.functional.options import check_positive_int
from lightning_rsm.namespaces import MisconfigurationException, is_lightning_class

if TYPE_CHECKING:  # annotations only: the module serves lightning.pytorch too
    import pytorch_lightning as pl


class Schedule(NamedTuple):
    """Evaluate every ``every_n_epochs`` epochs or ``every_n_train_steps`` steps (one is None).

    Example:
        >>> schedule = Schedule.from_options(None, 100)
        >>> schedule.by_steps, schedule.describe()
        (True, 'RSMMonitor(every_n_train_steps=100)')
    """

    every_n_epochs: int | None
    every_n_train_steps: int | None

    @classmethod
    def from_options(cls, every_n_epochs: object, every_n_train_steps: object) -> Schedule:
        """The schedule of the two options; by default every epoch.

        Raises:
            MisconfigurationException: If both are given, or one is not a positive int.
        """
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise MisconfigurationException(
                "Expected only one of `every_n_epochs` and `every_n_train_steps` to be set, but "
                f"got every_n_epochs={every_n_epochs!r} and "
                f"every_n_train_steps={every_n_train_steps!r}."
            )
        with as_misconfiguration():
            check_positive_int(every_n_epochs, "every_n_epochs", optional=True)
            check_positive_int(every_n_train_steps, "every_n_train_steps", optional=True)
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        return cls(every_n_epochs, every_n_train_steps)  # type: ignore[arg-type]

    @property
    def by_steps(self) -> bool:
        return self.every_n_train_steps is not None

    def describe(self) -> str:
        if self.every_n_train_steps is not None:
            return f"RSMMonitor(every_n_train_steps={self.every_n_train_steps})"
        return f"RSMMonitor(every_n_epochs={self.every_n_epochs})"

    def is_due(
        self, trainer: pl.Trainer, *, after_step: bool, last_epoch: int, last_step: int
    ) -> bool:
        """Whether to evaluate now: after a step (``on_train_batch_end``) or an epoch.

        A step is counted once, also when several batches accumulate into it.
        """
        if self.every_n_train_steps is not None:
            step = trainer.global_step
            return (
                after_step
                and step > 0
                and step != last_step
                and not step % self.every_n_train_steps
            )
        epoch = trainer.current_epoch
        return not after_step and epoch != last_epoch and not (epoch + 1) % self.every_n_epochs

    def logs_to_loggers(self, background: bool) -> bool:
        """Whether the callback sends the scores to the loggers itself, at the step where the
        features were taken: per step (Lightning sends step values to loggers only every
        ``log_every_n_steps`` steps) and in the background (they arrive at a later step)."""
        return self.by_steps or background

    def log(
        self,
        pl_module: pl.LightningModule,
        scores: dict[str, float],
        *,
        on_step: bool,
        background: bool,
    ) -> None:
        """Give the scores to ``pl_module.log``, where ``ModelCheckpoint``, ``EarlyStopping``
        and ``trainer.callback_metrics`` see them: in ``on_train_batch_end`` (``on_step``) as a
        step value, in an epoch-end hook as the epoch's. To the loggers as well only per epoch
        and synchronously; else the callback has sent them (:meth:`logs_to_loggers`).
        """
        # None, not True: Lightning warns of logger=True when the Trainer has no logger
        logger = False if self.logs_to_loggers(background) else None
        for name, value in scores.items():
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step, logger=logger,
                          batch_size=1)  # fmt: skip


# ------------------------------------------------------------------ callbacks that read scores


class _Reads(NamedTuple):
    """When a callback reads its monitored key: ``kind`` is ``"steps"`` (every ``period``
    optimizer steps), ``"epochs"`` (every ``period`` epochs, at the epoch's end), ``"time"``
    (at wall-clock intervals) or ``"mid-epoch"`` (after validation runs inside an epoch);
    ``at_train_epoch_end``: in ``on_train_epoch_end`` (so its place among the callbacks counts)."""

    kind: str
    period: int = 0
    at_train_epoch_end: bool = False


def check_score_readers(
    schedule: Schedule, trainer: pl.Trainer, monitor: Any, *, background: bool = False
) -> None:
    """Raise if a ``ModelCheckpoint`` or ``EarlyStopping`` monitors an ``rsm/`` key at times when
    ``monitor`` has not just logged it. Call it in ``on_train_start`` (validation is set up).

    With ``background`` and a step schedule every such reader is an error: a step's scores
    reach ``pl_module.log`` at a later batch, so a reader would pair a checkpoint or a stop
    with an earlier step's score. (Per epoch, background scores reach the readers late by
    design, as documented by ``RSMMonitor``.)

    Raises:
        MisconfigurationException: naming the callback, when each side acts, and the setting
            that fixes it.
    """
    callbacks = list(trainer.callbacks)
    position = callbacks.index(monitor) if monitor in callbacks else -1
    for index, callback in enumerate(callbacks):
        key = getattr(callback, "monitor", None)
        if not (isinstance(key, str) and key.startswith("rsm/")):
            continue
        if is_lightning_class(callback, "ModelCheckpoint"):
            name, reads = "ModelCheckpoint", _checkpoint_reads(callback, trainer)
        elif is_lightning_class(callback, "EarlyStopping"):
            name, reads = "EarlyStopping", _early_stopping_reads(callback, trainer)
        else:
            continue
        problem = reads and (
            _background_mismatch(schedule, background)
            or _mismatch(schedule, name, reads, trainer, before=index < position)
        )
        if problem:
            raise MisconfigurationException(
                f"Expected `{name}(monitor={key!r})` to read the key when `RSMMonitor` logs it, "
                f"but {problem}."
            )


def _has_validation(trainer: pl.Trainer) -> bool:
    batches = trainer.num_val_batches
    return sum(batches) > 0 if isinstance(batches, list) else bool(batches)


def _validation_reads(trainer: pl.Trainer, every_n_epochs: int) -> _Reads | None:
    """When a callback that reads after each validation (every n-th epoch) reads."""
    if not _has_validation(trainer):
        return None
    every_val = trainer.check_val_every_n_epoch
    if every_val is None or trainer.val_check_interval != 1.0:
        return _Reads("mid-epoch")
    return _Reads("epochs", math.lcm(every_n_epochs, every_val))


def _checkpoint_reads(callback: Any, trainer: pl.Trainer) -> _Reads | None:
    """Mirrors ``ModelCheckpoint``'s triggers (``_should_save_on_train_epoch_end``)."""
    if getattr(callback, "_every_n_train_steps", 0):
        return _Reads("steps", callback._every_n_train_steps)
    if getattr(callback, "_train_time_interval", None) is not None:
        return _Reads("time")
    every_n_epochs = getattr(callback, "_every_n_epochs", 1)
    if not every_n_epochs:
        return None
    at_train_end = getattr(callback, "_save_on_train_epoch_end", None)
    if at_train_end is None:
        at_train_end = trainer.check_val_every_n_epoch == 1 and (
            not _has_validation(trainer) or trainer.val_check_interval == 1.0
        )
    if at_train_end:
        return _Reads("epochs", every_n_epochs)  # checkpoints run last: its place is no matter
    return _validation_reads(trainer, every_n_epochs)


def _early_stopping_reads(callback: Any, trainer: pl.Trainer) -> _Reads:
    """Mirrors ``EarlyStopping``: every training epoch end, or after every validation."""
    at_train_end = getattr(callback, "_check_on_train_epoch_end", None)
    if at_train_end is None:  # resolved in its `setup`; the same rule
        at_train_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
    if at_train_end:
        return _Reads("epochs", 1, at_train_epoch_end=True)
    return _validation_reads(trainer, 1)


def _background_mismatch(schedule: Schedule, background: bool) -> str | None:
    """Why a step schedule in the background has no reader of its scores (with the fix)."""
    if not (background and schedule.by_steps):
        return None
    n = schedule.every_n_train_steps
    return (
        f"`RSMMonitor(every_n_train_steps={n}, background=True)` logs the scores of a step at a "
        "later training batch, when the worker has finished, so it would read an earlier step's "
        f"score: pass `RSMMonitor(every_n_train_steps={n}, background=False)`, or evaluate per "
        "epoch (`every_n_epochs`), where background scores reach it at epoch ends"
    )


def _mismatch(
    schedule: Schedule, name: str, reads: _Reads, trainer: pl.Trainer, *, before: bool
) -> str | None:
    """Why ``reads`` misses the monitor's evaluations (with the fix), or None if it does not."""
    monitor = schedule.describe()
    n = schedule.every_n_train_steps or schedule.every_n_epochs
    if reads.kind == "mid-epoch":
        fix = (
            "`ModelCheckpoint(save_on_train_epoch_end=True)`"
            if name == "ModelCheckpoint"
            else "`EarlyStopping(check_on_train_epoch_end=True)`"
        )
        return (
            "it reads after validation runs that do not end an epoch "
            f"(val_check_interval={trainer.val_check_interval!r}, check_val_every_n_epoch="
            f"{trainer.check_val_every_n_epoch!r}), where `{monitor}` has not logged it: pass {fix}"
        )
    if reads.kind == "time":
        if schedule.every_n_train_steps == 1:
            return None
        return (
            f"it reads at time intervals and `{monitor}` does not log it at every step: pass "
            f"`ModelCheckpoint(every_n_epochs=...)` or `every_n_train_steps=...` instead"
        )
    if schedule.by_steps:
        if reads.kind == "steps":
            if reads.period % n == 0:
                return None
            return (
                f"it reads every {reads.period} steps and `{monitor}` logs it every {n}: pass "
                f"`ModelCheckpoint(every_n_train_steps={n})` (or a multiple) or "
                f"`RSMMonitor(every_n_train_steps={reads.period})`"
            )
        fix = (
            f"`ModelCheckpoint(every_n_train_steps={n})`"
            if name == "ModelCheckpoint"
            else "`RSMMonitor(every_n_epochs=1)`"
        )
        return f"it reads at epoch ends and `{monitor}` logs it after steps: pass {fix}"
    if reads.kind == "steps":
        return (
            f"it reads every {reads.period} steps and `{monitor}` logs it at epoch ends: pass "
            f"`RSMMonitor(every_n_train_steps={reads.period})` or "
            f"`ModelCheckpoint(every_n_epochs={n})`"
        )
    if reads.period % n:
        fix = (
            f"`ModelCheckpoint(every_n_epochs={n})` (or a multiple)"
            if name == "ModelCheckpoint"
            else f"`EarlyStopping(check_on_train_epoch_end=False)` with `Trainer("
            f"check_val_every_n_epoch={n})`"
        )
        return (
            f"it reads every {reads.period} epoch(s) and `{monitor}` logs it every {n}: pass "
            f"{fix} or `RSMMonitor(every_n_epochs={math.gcd(reads.period, n)})`"
        )
    runs_validation_last = (
        _has_validation(trainer)
        and trainer.check_val_every_n_epoch == 1
        and trainer.val_check_interval == 1.0
    )
    if reads.at_train_epoch_end and before and not runs_validation_last:
        return (
            f"it reads in `on_train_epoch_end` before `RSMMonitor` (listed after it), which "
            f"evaluates there in epochs without validation: list `RSMMonitor` before `{name}` "
            "in `callbacks`"
        )
    return None
