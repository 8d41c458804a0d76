"""Where a finished evaluation of :class:`~lightning_rsm.callbacks.RSMMonitor` goes, and at which
step: the one path for synchronous and background evaluations alike.

:func:`report` appends the history row, keeps the scores in ``trainer.callback_metrics`` (where
``ModelCheckpoint``, ``EarlyStopping`` and any other callback read them, as Lightning's
``LearningRateMonitor`` keeps its values) and sends the scalars and images to every logger, all
at one step, :func:`log_step`:

- an evaluation after an epoch: the step Lightning gives the epoch's other metrics (a
  ``val_loss`` logged in ``validation_step`` or ``on_validation_epoch_end``, an ``on_epoch``
  training metric), that is, the step of the epoch's last training batch;
- an evaluation every ``every_n_train_steps`` steps: ``trainer.global_step`` after the step
  (a multiple of ``every_n_train_steps``).

The step is taken when the features are, so a background evaluation is logged at the same step
as a synchronous one. History rows keep ``step`` as ``trainer.global_step`` at the capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lightning_rsm.archive import ArchiveWriter
from lightning_rsm.callbacks import archiving
from lightning_rsm.callbacks.evaluation import Outcome
from lightning_rsm.image_logging import log_images
from lightning_rsm.plotting import figure_to_rgb

if TYPE_CHECKING:  # annotations only: the module serves lightning.pytorch too
    import pytorch_lightning as pl
    from matplotlib.figure import Figure


def log_step(trainer: pl.Trainer, *, by_steps: bool, last_batch_counted: bool) -> int:
    """The step at which an evaluation taken now is logged (see the module's docstring).

    ``last_batch_counted``: whether Lightning has already counted the epoch's last batch
    (in ``on_train_epoch_end``, not yet in the validation that ends the epoch). The count is
    ``fit_loop.epoch_loop._batches_that_stepped``, the step Lightning's logger connector,
    ``LearningRateMonitor`` and ``DeviceStatsMonitor`` log at.
    """
    if by_steps:
        return trainer.global_step
    stepped = trainer.fit_loop.epoch_loop._batches_that_stepped
    return max(0, stepped - 1 if last_batch_counted else stepped)


def report(
    trainer: pl.Trainer,
    outcome: Outcome,
    history: list[dict[str, float]],
    *,
    warn_once: Callable[[str], Any],
    archive: ArchiveWriter | None = None,
) -> None:
    """Deliver a finished evaluation: a row of ``history`` (``epoch``, ``step`` and the scores),
    the scores in ``trainer.callback_metrics`` (tensors on the root device, the same on every
    rank), and ``epoch`` and the scores to every logger with ``log_metrics(..., step=...)``,
    then the images (:func:`~lightning_rsm.image_logging.log_images`), at ``outcome.log_step``;
    the loggers on global rank zero only; with an ``archive`` (rank zero, ``save_rsms=True``),
    the RSMs to it (:func:`~lightning_rsm.callbacks.archiving.save`)."""
    history.append({"epoch": outcome.epoch, "step": outcome.step, **outcome.scores})
    device = trainer.strategy.root_device
    trainer.callback_metrics.update(
        {name: torch.tensor(value, device=device) for name, value in outcome.scores.items()}
    )
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics({"epoch": outcome.epoch, **outcome.scores}, step=outcome.log_step)
        logger.save()
    if outcome.images:
        log_images(trainer.loggers, outcome.images, outcome.log_step, warn_once=warn_once)
    if archive is not None:
        archiving.save(archive, outcome)


def report_history(
    trainer: pl.Trainer,
    draw: Callable[[], Figure],
    log_step: int,
    *,
    warn_once: Callable[[str], Any],
) -> None:
    """At fit end: the figure of every score over the evaluations (``draw()``) to every logger
    that takes images, as ``rsm/history``, at ``log_step`` (the last evaluation's); drawn and
    sent by global rank zero only, and only when there is a logger."""
    if trainer.is_global_zero and trainer.loggers:
        image = figure_to_rgb(draw())
        log_images(trainer.loggers, {"rsm/history": image}, log_step, warn_once=warn_once)
