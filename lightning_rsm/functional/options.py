"""Every option's allowed values and default, and the checks that every layer shares.

The functional API, the Metrics, the callback and the command line all take their choices,
defaults and checks from here, so that a name or a rule is written once. Each ``check_*``
helper only raises (``ValueError`` for a bad value, ``TypeError`` for a bad type) with a
message that names the argument, says what was expected, then what it got.

====================  =============================================  =====================
option                allowed values                                 used by
====================  =============================================  =====================
``kernel``            :data:`KERNELS`                                every RSM
``matcher``           :data:`MATCHERS`                               the semantic RSM
``method``            :data:`COMPARISON_METHODS`                     RSM comparison (RSA)
``correlation``       :data:`CORRELATIONS`                           probability agreement
``empty_target_...``  :data:`EMPTY_TARGET_ACTIONS`                   retrieval scores
``max_positions``     a positive int or None; tools default to       Metrics, callback, CLI
                      :data:`DEFAULT_MAX_POSITIONS`
====================  =============================================  =====================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNELS = ("cosine", "inner", "rbf")
MATCHERS = ("auction", "exact", "greedy", "windowed")
#: Matchers that run as batched torch code on the tensors' device (no scipy).
TORCH_MATCHERS = ("auction", "greedy")
COMPARISON_METHODS = ("cka", "kendall", "pearson", "spearman")
CORRELATIONS = ("kendall", "pearson", "spearman")
EMPTY_TARGET_ACTIONS = ("error", "neg", "pos", "skip")

#: Positions (``H * W`` or ``T``) per sample kept by the Metrics, the callback and the command
#: line (an 8 x 8 grid); larger maps are average-pooled. The exact matcher costs about O(S^3)
#: per pair, so this keeps an evaluation of a few hundred samples at seconds.
DEFAULT_MAX_POSITIONS = 64


def is_positive_int(value: object) -> bool:
    """True for an int above 0 (bools excluded).

    Example:
        >>> is_positive_int(3), is_positive_int(0), is_positive_int(True), is_positive_int(2.0)
        (True, False, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_choice(value: object, choices: tuple[str, ...], name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``, listing them sorted.

    Example:
        >>> check_choice("cosine", KERNELS, "kernel")
        >>> check_choice("l2", KERNELS, "kernel")
        Traceback (most recent call last):
        ...
        ValueError: Expected `kernel` to be one of ['cosine', 'inner', 'rbf'], but got 'l2'.
    """
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {sorted(choices)}, but got {value!r}.")


def check_positive_int(value: object, name: str, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or None when ``optional``)."""
    if optional and value is None:
        return
    if not is_positive_int(value):
        expected = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"Expected `{name}` to be {expected}, but got {value!r}.")


def check_positive_number(value: object, name: str, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number above 0 (or None if optional)."""
    if optional and value is None:
        return
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    ):
        expected = "a positive finite number or None" if optional else "a positive finite number"
        raise ValueError(f"Expected `{name}` to be {expected}, but got {value!r}.")


def check_rsm_options(
    kernel: object,
    matcher: object = "exact",
    sigma: object = None,
    window: object = 8,
    tol: object = 1e-4,
    max_positions: object = None,
) -> None:
    """Raise ``ValueError`` for a bad option of a semantic RSM; the one home of these checks.

    Example:
        >>> check_rsm_options("cosine", "auction", tol=0.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `tol` to be a positive finite number, but got 0.0.
    """
    check_choice(kernel, KERNELS, "kernel")
    check_choice(matcher, MATCHERS, "matcher")
    check_positive_number(sigma, "sigma", optional=True)
    check_positive_int(window, "window")
    check_positive_number(tol, "tol")
    check_positive_int(max_positions, "max_positions", optional=True)


def check_labels(labels: object, n: int, context: str = "the RSM of {n} samples") -> None:
    """Raise unless ``labels`` are N class ids ``(N,)`` (integer or bool) or multi-hot ``(N, L)``.

    ``context`` (formatted with ``n``) says in messages what the N samples are.

    Example:
        >>> check_labels(torch.tensor([0.0, 1.0]), 2)
        Traceback (most recent call last):
        ...
        TypeError: Expected class-id `labels` of shape (N,) to have an integer or bool dtype, \
but got torch.float32.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `labels` to be a torch.Tensor, but got {type(labels).__name__}.")
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        raise ValueError(
            f"Expected `labels` to have shape ({n},) (class ids) or ({n}, L) (multi-hot) to match "
            f"{context.format(n=n)}, but got shape {tuple(labels.shape)}."
        )
    if labels.ndim == 1:
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(
                f"Expected class-id `labels` of shape (N,) to have an integer or bool dtype, "
                f"but got {labels.dtype}."
            )
        return
    if labels.is_complex():
        raise TypeError(
            f"Expected multi-hot `labels` to have a real dtype, but got {labels.dtype}."
        )
    if labels.dtype != torch.bool and not ((labels == 0) | (labels == 1)).all():
        bad = labels[(labels != 0) & (labels != 1)]
        raise ValueError(
            f"Expected multi-hot `labels` of shape (N, L) to hold only 0 and 1, "
            f"but got the value {bad[0].item()!r}."
        )
