r"""Sending images (the monitor's figures, rendered by
:func:`~lightning_rsm.plotting.figure_to_rgb`) to every logger of a Trainer.

:func:`log_images` takes the Trainer's loggers (``trainer.loggers``), a mapping of tag to RGB
image and the step, and hands each image to each logger in the form that logger takes images.
Loggers are recognised by their Lightning class (or a subclass of it), from ``lightning.pytorch``
or ``pytorch_lightning`` alike. What each one receives, for a tag such as
``rsm/conv/heatmap`` and step ``s`` (``trainer.global_step``):

=========================  ======================================================================
``TensorBoardLogger``      ``logger.experiment.add_image(tag, image, global_step=s,
                           dataformats="HWC")``: the Images tab, one slider per tag.
``WandbLogger``            ``logger.log_image(key=tag, images=[image], step=s)``: a media panel
                           per tag, against ``trainer/global_step``; the run keeps the PNGs under
                           ``files/media/images/``.
``MLFlowLogger``           ``logger.experiment.log_image(logger.run_id, image, key=tag, step=s)``:
                           MLflow's stepped images (artifacts ``images/<tag, "/" -> "~">+step+s
                           +...png``); characters MLflow refuses in a key (anything but letters,
                           digits, ``_ - . /`` and space) become ``_``. MLflow older than 2.12
                           (no ``key``) gets the artifact ``rsm/<file name>`` (as below).
``CometLogger``            ``logger.experiment.log_image(image, name=tag, step=s,
                           image_channels="last")``. Untested: ``comet_ml`` cannot run offline
                           here without an account.
any other logger with a    a PNG file ``<log_dir>/rsm/<file name>`` (e.g. ``CSVLogger``), where
``log_dir``                the file name is :func:`image_file_name`: the tag with each ``/``
                           replaced by ``__`` (any other character outside letters, digits,
                           ``. _ -`` by ``_``), then ``_step`` and the step in 8 digits:
                           ``rsm__conv__heatmap_step00000042.png``. No sub-folders;
                           a later image of the same tag and step overwrites the earlier one.
any other logger           nothing, with one warning naming its class.
=========================  ======================================================================

A logger that fails to take an image (a full disk, a closed run, a network error) costs a
warning that names the logger and the error, never an exception: training goes on, and the
other loggers still get their images. Images are sent by global rank zero only, each once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_rsm import namespaces

__all__ = ["image_file_name", "log_images"]

Images = Mapping[str, np.ndarray]

_warning_cache: Any = None  # a WarningCache, made on the first warning


def _tensorboard(logger: Any, images: Images, step: int) -> None:
    for tag, image in images.items():
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def _wandb(logger: Any, images: Images, step: int) -> None:
    for tag, image in images.items():
        logger.log_image(key=tag, images=[image], step=step)


def _mlflow(logger: Any, images: Images, step: int) -> None:
    import inspect

    client, run_id = logger.experiment, logger.run_id
    stepped = "key" in inspect.signature(client.log_image).parameters  # MLflow >= 2.12
    for tag, image in images.items():
        if stepped:
            key = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", tag)
            client.log_image(run_id, image, key=key, step=step)
        else:
            client.log_image(run_id, image, artifact_file=f"rsm/{image_file_name(tag, step)}")


def _comet(logger: Any, images: Images, step: int) -> None:
    for tag, image in images.items():
        logger.experiment.log_image(image, name=tag, step=step, image_channels="last")


def _files(logger: Any, images: Images, step: int) -> None:
    from PIL import Image

    folder = os.path.join(os.fspath(logger.log_dir), "rsm")
    os.makedirs(folder, exist_ok=True)
    for tag, image in images.items():
        Image.fromarray(image).save(os.path.join(folder, image_file_name(tag, step)))


#: Adapters by Lightning logger class name; a subclass of one of these classes gets its adapter.
_ADAPTERS: dict[str, Callable[[Any, Images, int], None]] = {
    "TensorBoardLogger": _tensorboard,
    "WandbLogger": _wandb,
    "MLFlowLogger": _mlflow,
    "CometLogger": _comet,
}


def _adapter(logger: Any) -> Callable[[Any, Images, int], None] | None:
    for name, adapter in _ADAPTERS.items():
        if namespaces.is_lightning_class(logger, name):
            return adapter
    if getattr(logger, "log_dir", None) is not None:
        return _files
    return None


def image_file_name(tag: str, step: int) -> str:
    """The PNG file name of an image for loggers that get files: flat, one per tag and step.

    Args:
        tag: the image's tag, e.g. ``"rsm/conv/heatmap"``.
        step: a non-negative int.

    Returns:
        the tag with each ``/`` replaced by ``__`` and any other character outside letters,
        digits, ``.``, ``_`` and ``-`` by ``_``, then ``_step`` and the step in 8 digits.

    Example:
        >>> image_file_name("rsm/layer1.0/heatmap", 42)
        'rsm__layer1.0__heatmap_step00000042.png'
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", tag.replace("/", "__"))
    return f"{name}_step{step:08d}.png"


def _check_images(images: Images, step: int) -> dict[str, np.ndarray]:
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"Expected `step` to be a non-negative int, but got {step!r}.")
    if not isinstance(images, Mapping):
        raise TypeError(
            f"Expected `images` to be a mapping of tag -> image, but got {type(images).__name__}."
        )
    checked = {}
    for tag, image in images.items():
        if not (isinstance(tag, str) and tag):
            raise TypeError(f"Expected the tags of `images` to be non-empty str, but got {tag!r}.")
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"Expected `images[{tag!r}]` to be a uint8 array of shape (H, W, 3), but got "
                f"{array.dtype} of shape {array.shape}."
            )
        checked[tag] = np.ascontiguousarray(array)
    return checked


def _warn_once(message: str) -> None:
    global _warning_cache
    if _warning_cache is None:
        _warning_cache = namespaces.WarningCache()
    _warning_cache.warn(message)


def log_images(
    loggers: Sequence[Any],
    images: Images,
    step: int,
    *,
    warn_once: Callable[[str], None] | None = None,
) -> None:
    """Send each image to each logger that takes images; on global rank zero only.

    What each kind of logger receives (tags, steps, file names) is listed in the docstring of
    :mod:`lightning_rsm.image_logging`. A logger that fails to take the images is skipped with a
    warning naming it and the error; a logger that takes no images and has no ``log_dir`` is
    skipped with a warning. Each distinct message is warned once (per process by default; pass
    ``warn_once`` to scope that to a callback). On another rank than 0 this does nothing.

    Args:
        loggers: the Trainer's loggers (``trainer.loggers``), from either Lightning namespace;
            any object with a ``log_dir`` gets PNG files.
        images: tag -> uint8 RGB image of shape ``(H, W, 3)`` (as made by
            :func:`~lightning_rsm.plotting.figure_to_rgb`).
        step: the step the images belong to (``trainer.global_step``), a non-negative int.
        warn_once: called with each warning message, e.g. a callback's own
            ``WarningCache().warn``; default a ``WarningCache`` shared by the process.

    Raises:
        TypeError: If ``images`` is not a mapping or a tag is not a non-empty str.
        ValueError: If an image is not a uint8 array of shape ``(H, W, 3)`` or ``step`` is not
            a non-negative int.

    Example:
        >>> import os, tempfile, torch
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> from lightning_rsm.plotting import figure_to_rgb, heatmap_figure
        >>> folder = tempfile.TemporaryDirectory()
        >>> logger = CSVLogger(folder.name, name="run")
        >>> image = figure_to_rgb(heatmap_figure({"semantic": torch.rand(4, 4)}, layer="conv"))
        >>> log_images([logger], {"rsm/conv/heatmap": image}, 7)
        >>> os.listdir(os.path.join(logger.log_dir, "rsm"))
        ['rsm__conv__heatmap_step00000007.png']
        >>> folder.cleanup()
    """
    checked = _check_images(images, step)
    if not checked or namespaces.rank_zero_only.rank != 0:
        return
    warn = _warn_once if warn_once is None else warn_once
    for logger in loggers:
        name = type(logger).__name__
        try:
            adapter = _adapter(logger)  # reads `log_dir`, which may fail too
            if adapter is None:
                warn(
                    f"`{name}` takes no images and has no `log_dir`: RSM figures are not logged "
                    "to it. Images go to TensorBoard, W&B, MLflow and Comet loggers, and as PNG "
                    "files to any logger with a `log_dir`."
                )
                continue
            adapter(logger, checked, step)
        except Exception as error:  # a logger's fault must not stop training
            warn(
                f"`{name}` failed to take the RSM images, which are skipped for it; training "
                f"goes on. {type(error).__name__}: {error}"
            )
