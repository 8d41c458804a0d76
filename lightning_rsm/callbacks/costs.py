"""What monitoring costs training, and the settings that would bring it under a budget.

:class:`~lightning_rsm.callbacks.RSMMonitor` measures, on the training thread, the seconds of
each evaluation (the probe's capture, the RSMs and scores, the time training waited for the
background worker) and the training time between two evaluations. :func:`cost_advice` turns
those numbers into one warning when monitoring adds more than ``budget`` (a quarter) to
training time; :func:`worker_has_a_core` says whether a background worker has a core of its
own. Both are pure: numbers in, text or a bool out; :class:`Measured` holds the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUDGET = 0.25  # monitoring may add this fraction to training time without a warning
MIN_SECONDS = 1.0  # evaluations that block training for less than this never warn
MIN_PROBE = 10  # a smaller probe is not suggested: its scores would say little


@dataclass(frozen=True)
class Settings:
    """The options :func:`cost_advice` suggests new values for.

    Attributes:
        probe_size: samples in the probe (N).
        probe_given: whether the probe was passed (advice: a shorter probe), else drawn from
            the validation data (advice: ``probe_size``).
        every_n: the evaluation interval, in epochs or (``by_steps``) optimizer steps.
        by_steps: whether evaluations are scheduled by ``every_n_train_steps``.
        max_positions: the positions kept per sample, or None (all).
        background: whether the RSMs are computed on the background worker.
        free_core: whether a background worker would have a core of its own.
    """

    probe_size: int
    probe_given: bool
    every_n: int
    by_steps: bool
    max_positions: int | None
    background: bool
    free_core: bool


def cost_advice(
    capture_s: float,
    compute_s: float,
    wait_s: float,
    interval_s: float,
    settings: Settings,
    budget: float = BUDGET,
) -> str | None:
    """The warning when monitoring adds more than ``budget`` to training time, else None.

    Per evaluation: ``capture_s`` seconds of probe forward, ``compute_s`` of RSMs and scores
    (on the training thread unless ``settings.background``), ``wait_s`` that training waited
    for the worker; ``interval_s`` seconds of training between two evaluations. The RSMs'
    cost grows with the square of the probe size N and faster than the square of the
    positions S; training time between evaluations grows linearly with the interval.

    Example:
        >>> settings = Settings(500, False, 1, False, 64, False, True)
        >>> print(cost_advice(1.0, 15.0, 0.0, 20.0, settings))  # doctest: +NORMALIZE_WHITESPACE
        RSMMonitor: monitoring adds 80% to training time (per evaluation: probe forward 1.0 s,
        RSMs and scores 15.0 s on the training thread; training between two evaluations:
        20.0 s). Any of these would bring it under 25%:
        every_n_epochs=4, probe_size=272 (the RSMs' cost grows with N^2), max_positions=41,
        background=True (a core is free for it).
        >>> cost_advice(1.0, 3.0, 0.0, 20.0, settings) is None  # 20% is within the budget
        True
    """
    blocking = wait_s if settings.background else compute_s  # what grows as N^2 on the thread
    blocked = capture_s + blocking
    interval_s = max(interval_s, 1e-9)
    if blocked < MIN_SECONDS or blocked <= budget * interval_s:
        return None
    allowed = budget * interval_s
    schedule = "every_n_train_steps" if settings.by_steps else "every_n_epochs"
    advice = [f"{schedule}={math.ceil(settings.every_n * blocked / allowed)}"]
    ratio = _probe_ratio(capture_s, blocking, allowed)
    if ratio is not None and settings.probe_size * ratio >= MIN_PROBE:
        size = math.floor(settings.probe_size * ratio)
        probe = f"a probe of {size} samples" if settings.probe_given else f"probe_size={size}"
        advice.append(f"{probe} (the RSMs' cost grows with N^2)")
    if blocking > 0 and allowed > capture_s and settings.max_positions is not None:
        shrink = ((allowed - capture_s) / blocking) ** (1 / 3)  # a pair's cost: about S^3
        if math.floor(settings.max_positions * shrink) >= 1:
            advice.append(f"max_positions={math.floor(settings.max_positions * shrink)}")
    elif settings.max_positions is None:
        advice.append("max_positions=64 (now every position is kept)")
    if not settings.background and settings.free_core:
        advice.append("background=True (a core is free for it)")
    where = "on the training thread"
    if settings.background:
        where = f"on the worker, training waited {wait_s:.1f} s for it"
    return (
        f"RSMMonitor: monitoring adds {blocked / interval_s:.0%} to training time (per "
        f"evaluation: probe forward {capture_s:.1f} s, RSMs and scores {compute_s:.1f} s {where}; "
        f"training between two evaluations: {interval_s:.1f} s). Any of these would bring it "
        f"under {budget:.0%}: {', '.join(advice)}."
    )


def _probe_ratio(capture_s: float, blocking_s: float, allowed_s: float) -> float | None:
    """The probe size ratio r < 1 with ``capture_s * r + blocking_s * r^2 = allowed_s``."""
    if blocking_s <= 0:
        return allowed_s / capture_s if capture_s > 0 else None
    root = (-capture_s + math.sqrt(capture_s**2 + 4 * blocking_s * allowed_s)) / (2 * blocking_s)
    return min(root, 1.0)


def worker_has_a_core(cores: int, training_threads: int, solver_threads: int) -> bool:
    """Whether ``cores`` leave the background worker's ``solver_threads`` a core of their own
    beside training's ``training_threads`` torch threads.

    Example:
        >>> worker_has_a_core(cores=2, training_threads=2, solver_threads=1)
        False
        >>> worker_has_a_core(cores=8, training_threads=4, solver_threads=1)
        True
    """
    return cores >= training_threads + solver_threads


@dataclass
class Measured:
    """Seconds measured on the training thread during one fit (``RSMMonitor`` owns one).

    Attributes:
        start: ``time.perf_counter()`` when training started.
        captures: evaluations captured (probe forwards).
        capture_s: seconds of those probe forwards.
        deliveries: evaluations computed and reported.
        evaluation_s: their ``rsm/time_s`` (probe forward plus RSMs and scores).
        wait_s: seconds training waited for the background worker.
        warned: whether the cost warning was given in this fit.
    """

    start: float = 0.0
    captures: int = 0
    capture_s: float = 0.0
    deliveries: int = 0
    evaluation_s: float = 0.0
    wait_s: float = 0.0
    warned: bool = False
