"""Lightning's two import names, ``lightning.pytorch`` and ``pytorch_lightning``, served as one.

Lightning ships one Trainer under two names: the ``lightning`` package (``import lightning as
L``, Trainer in ``lightning.pytorch``) and the standalone ``pytorch-lightning`` package
(``pytorch_lightning``, with ``lightning_fabric``). Their classes are distinct objects, so a
callback subclassing ``pytorch_lightning.Callback`` is rejected by ``lightning.pytorch.Trainer``
("Expected a parent"), and an ``isinstance`` check against one name's ``TensorBoardLogger``
misses the other's. With this module the rest of lightning_rsm serves both with one code path:

=============================  ==============================================================
``CALLBACK_BASES``             the ``Callback`` class of every importable namespace, for
                               ``class MyCallback(*CALLBACK_BASES)``: one class that both
                               Trainers accept
``MisconfigurationException``  a subclass of every importable namespace's
                               ``MisconfigurationException``, so ``except`` (and
                               ``pytest.raises``) with either one catches it
``is_lightning_class``         whether a logger (or any object) is of a Lightning class of a
                               given name, from any namespace, without importing one
``is_fitting``                 whether the Trainer runs ``fit`` (``TrainerFn`` is a ``str``
                               enum, so no namespace's ``TrainerFn`` is needed)
``rank_zero_warn``,            from the first importable namespace's
``rank_zero_only``,            ``utilities.rank_zero``; both namespaces re-export the same
``WarningCache``               ``lightning_utilities`` objects, so the rank that either Trainer
                               sets (``rank_zero_only.rank``) applies
=============================  ==============================================================

Nothing here imports Lightning until one of these names (other than the two functions) is
first read; a namespace that is not installed (or fails to import) is left out, and reading
one raises ``ModuleNotFoundError`` only when neither namespace can be imported.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

__all__ = [
    "CALLBACK_BASES",  # noqa: F822 (made on first read, in __getattr__)
    "MisconfigurationException",  # noqa: F822
    "WarningCache",  # noqa: F822
    "importable_namespaces",
    "is_fitting",
    "is_lightning_class",
    "rank_zero_only",  # noqa: F822
    "rank_zero_warn",  # noqa: F822
]

#: Names that ``__getattr__`` takes from the first importable namespace's ``utilities.rank_zero``.
_RANK_ZERO_NAMES = frozenset({"WarningCache", "rank_zero_only", "rank_zero_warn"})

#: The Trainer's namespaces, in the order their classes appear among ``CALLBACK_BASES``.
NAMESPACES = ("lightning.pytorch", "pytorch_lightning")

#: Top-level packages whose classes count as Lightning's in ``is_lightning_class``.
_LIGHTNING_PACKAGES = frozenset({"lightning", "pytorch_lightning", "lightning_fabric"})


@functools.cache
def _import_namespaces() -> tuple[dict[str, Any], dict[str, str]]:
    """``({name: module}, {name: why it failed})`` over ``NAMESPACES``, imported once."""
    modules: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for name in NAMESPACES:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as error:  # not installed, or broken: the other namespace may serve
            failures[name] = f"{type(error).__name__}: {error}"
    return modules, failures


def importable_namespaces() -> tuple[str, ...]:
    """Names from ``NAMESPACES`` that import, e.g. ``("lightning.pytorch", "pytorch_lightning")``.

    Raises:
        ModuleNotFoundError: If neither namespace can be imported.
    """
    modules, failures = _import_namespaces()
    if not modules:
        raise ModuleNotFoundError(
            "Expected `lightning` (lightning.pytorch) or `pytorch-lightning` (pytorch_lightning) "
            f"to be importable, but got {failures}. Install one: `pip install lightning`."
        )
    return tuple(modules)


def _unique(classes: list[type]) -> tuple[type, ...]:
    return tuple(dict.fromkeys(classes))


@functools.cache
def _callback_bases() -> tuple[type, ...]:
    modules, _ = _import_namespaces()
    return _unique([modules[name].Callback for name in importable_namespaces()])


@functools.cache
def _misconfiguration_exception() -> type[Exception]:
    bases = _unique(
        [
            importlib.import_module(f"{name}.utilities.exceptions").MisconfigurationException
            for name in importable_namespaces()
        ]
    )
    return type(
        "MisconfigurationException",
        bases,
        {
            "__module__": __name__,
            "__doc__": "A configuration error; an instance of every importable Lightning "
            "namespace's ``MisconfigurationException``.",
        },
    )


def __getattr__(name: str) -> Any:
    # Module attributes made on first read, so that importing this module imports no Lightning.
    if name == "CALLBACK_BASES":
        return _callback_bases()
    if name == "MisconfigurationException":
        return _misconfiguration_exception()
    if name in _RANK_ZERO_NAMES:
        # Importing a namespace's rank_zero module sets `rank_zero_only.rank` from the
        # environment, which lightning_utilities' own functions need before their first call.
        module = importlib.import_module(f"{importable_namespaces()[0]}.utilities.rank_zero")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_lightning_class(obj: Any, name: str) -> bool:
    """Whether ``obj`` is an instance of a Lightning class called ``name``, from any namespace.

    The class of ``obj`` and its bases are searched for a class of that name defined in
    ``lightning``, ``pytorch_lightning`` or ``lightning_fabric``, so subclasses count and
    nothing is imported. A user's own class of the same name elsewhere does not count.

    Args:
        obj: any object, e.g. one of ``trainer.loggers``.
        name: a class name, e.g. ``"TensorBoardLogger"``.

    Returns:
        ``True`` or ``False``.

    Example:
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> is_lightning_class(CSVLogger("."), "CSVLogger"), is_lightning_class(1, "CSVLogger")
        (True, False)
    """
    return any(
        cls.__name__ == name and cls.__module__.partition(".")[0] in _LIGHTNING_PACKAGES
        for cls in type(obj).__mro__
    )


def is_fitting(trainer: Any) -> bool:
    """Whether ``trainer`` (of either namespace) runs ``fit``, not validate/test/predict.

    ``trainer.state.fn`` is a ``TrainerFn``, a ``str`` enum whose fitting value is ``"fit"`` in
    both namespaces, so it is compared with that string.
    """
    return trainer.state.fn == "fit"
