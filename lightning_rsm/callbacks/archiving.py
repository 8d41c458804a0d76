"""``RSMMonitor(save_rsms=True)``: every delivered evaluation's RSMs into the run's archive.

The archive (:mod:`lightning_rsm.archive`) lies in ``<log_dir>/rsms/`` of the Trainer's first
logger that has a ``log_dir`` (TensorBoard, CSV), else in ``<default_root_dir>/rsms/``. It is
opened at fit start, on global rank zero only, with the probe's labels, fingerprint and ids,
and written by :func:`~lightning_rsm.callbacks.reporting.report` on the training thread, one
file per evaluation (also for evaluations computed in the background).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightning_rsm.archive import FOLDER, ArchiveWriter, archive_steps, load_evaluation
from lightning_rsm.archive import probe_fingerprint as fingerprint_of
from lightning_rsm.callbacks.config import MonitorConfig
from lightning_rsm.callbacks.evaluation import Outcome
from lightning_rsm.namespaces import MisconfigurationException, rank_zero_warn

if TYPE_CHECKING:  # annotations only: the module serves lightning.pytorch too
    import pytorch_lightning as pl

#: The options recorded with every archived evaluation.
SETTINGS = ("kernel", "matcher", "sigma", "window", "tol", "max_positions", "baseline")
TOKEN_SETTINGS = ("special_tokens", "tokens", "token_grid", "method")


def archive_dir(trainer: pl.Trainer) -> Path:
    """``<log_dir>/rsms`` of the first logger with a ``log_dir``, else
    ``<default_root_dir>/rsms``."""
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir) / FOLDER
    return Path(trainer.default_root_dir) / FOLDER


def check_ids_match_probe(ids: Any, n: int) -> None:
    """Raise ``ValueError`` unless ``probe_ids`` (if given) holds one id per probe sample."""
    if ids is not None and len(ids) != n:
        raise ValueError(
            f"Expected `probe_ids` to hold {n} ids, one per probe sample, but got {len(ids)}."
        )


def open_archive(
    trainer: pl.Trainer, config: MonitorConfig, inputs: Any, labels: Tensor | None
) -> ArchiveWriter | None:
    """The archive writer on global rank zero with ``save_rsms=True``, else None.

    Raises:
        MisconfigurationException: If the folder already holds an archive of another probe
            (another fingerprint): a resumed run must add to its own archive only.
    """
    if not (config.save_rsms and trainer.is_global_zero):
        return None
    folder = archive_dir(trainer)
    fingerprint = fingerprint_of(inputs, labels)
    if folder.is_dir() and (steps := archive_steps(folder)):
        found = load_evaluation(folder, steps[-1]).fingerprint
        if found != fingerprint:
            raise MisconfigurationException(
                f"Expected the RSM archive {str(folder)!r} to be empty or of this run's probe "
                f"(fingerprint {fingerprint[:12]}), but it holds one of another probe "
                f"({found[:12]}); give the logger another version or move that folder."
            )
    settings = {name: getattr(config, name) for name in SETTINGS + TOKEN_SETTINGS}
    if isinstance(settings["token_grid"], tuple):
        settings["token_grid"] = "x".join(str(side) for side in settings["token_grid"])
    return ArchiveWriter(
        folder,
        fingerprint=fingerprint,
        labels=labels,
        ids=config.probe_ids,
        settings=settings,
        keep_every=config.save_every,
        keep_last=config.save_last,
    )


def save(archive: ArchiveWriter, outcome: Outcome) -> None:
    """Write one evaluation (its step is ``outcome.step``, as in the history); a failure to
    write is a warning and training goes on."""
    try:
        archive.write(
            step=outcome.step, epoch=outcome.epoch, rsms=outcome.rsms, logits=outcome.logits
        )
    except Exception as error:  # a full disk, a removed folder: monitoring must not stop training
        rank_zero_warn(
            f"`RSMMonitor` could not save the RSMs of step {outcome.step} to "
            f"{str(archive.folder)!r}; training goes on. {type(error).__name__}: {error}"
        )
