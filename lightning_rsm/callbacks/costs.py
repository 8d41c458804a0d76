"""What monitoring costs training, and the settings that would bring it under a budget.

:class:`~lightning_rsm.callbacks.RSMMonitor` measures, on the training thread, the seconds of
each evaluation (the probe's capture, the RSMs and scores, drawing and logging the pictures,
the time training waited for the background worker) and the training time between two
evaluations. :func:`steady_costs` turns them into the cost of a typical evaluation (the first
is left out: it compiles the solver, once per install, solves every pair cold and loads
matplotlib's fonts), :func:`cost_advice` into one warning when monitoring adds more than
``budget`` (a quarter) to training time; :func:`worker_has_a_core` says whether a background
worker has a core of its own. All are pure: numbers in, numbers, text or a bool out;
:class:`Measured` holds the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    pictures_s: float = 0.0,
) -> str | None:
    """The warning when monitoring adds more than ``budget`` to training time, else None.

    Per evaluation: ``capture_s`` seconds of probe forward, ``compute_s`` of RSMs and scores
    (on the training thread unless ``settings.background``), ``wait_s`` that training waited
    for the worker, ``pictures_s`` that the training thread spent on pictures and logging
    (drawing them too unless ``settings.background``); ``interval_s`` seconds of training
    between two evaluations. The RSMs' cost grows with the square of the probe size N and
    faster than the square of the positions S; the pictures' cost hardly depends on either;
    training time between evaluations grows linearly with the interval.

    Example:
        >>> settings = Settings(500, False, 1, False, 64, False, True)
        >>> message = cost_advice(1.0, 15.0, 0.0, 20.0, settings, pictures_s=1.0)
        >>> print(message)  # doctest: +NORMALIZE_WHITESPACE
        RSMMonitor: monitoring adds 85% to training time (per evaluation: probe forward 1.0 s,
        RSMs and scores 15.0 s, pictures and logging 1.0 s on the training thread; training
        between two evaluations: 20.0 s). Any of these would bring it under 25%:
        every_n_epochs=4, probe_size=242 (the RSMs' cost grows with N^2), max_positions=37,
        background=True (a core is free for it).
        >>> cost_advice(1.0, 3.0, 0.0, 20.0, settings) is None  # 20% is within the budget
        True
    """
    blocking = wait_s if settings.background else compute_s  # what grows as N^2 on the thread
    blocked = capture_s + blocking + pictures_s
    interval_s = max(interval_s, 1e-9)
    if blocked < MIN_SECONDS or blocked <= budget * interval_s:
        return None
    allowed = budget * interval_s
    fixed = capture_s + pictures_s  # per evaluation, whatever N and S
    schedule = "every_n_train_steps" if settings.by_steps else "every_n_epochs"
    advice = [f"{schedule}={math.ceil(settings.every_n * blocked / allowed)}"]
    ratio = _probe_ratio(capture_s, blocking, allowed - pictures_s)
    if ratio is not None and settings.probe_size * ratio >= MIN_PROBE:
        size = math.floor(settings.probe_size * ratio)
        probe = f"a probe of {size} samples" if settings.probe_given else f"probe_size={size}"
        advice.append(f"{probe} (the RSMs' cost grows with N^2)")
    if blocking > 0 and allowed > fixed and settings.max_positions is not None:
        shrink = ((allowed - fixed) / blocking) ** (1 / 3)  # a pair's cost: about S^3
        if math.floor(settings.max_positions * shrink) >= 1:
            advice.append(f"max_positions={math.floor(settings.max_positions * shrink)}")
    elif settings.max_positions is None:
        advice.append("max_positions=64 (now every position is kept)")
    if pictures_s > 0 and capture_s + blocking <= allowed:
        advice.append(f"log_images=False (pictures take {pictures_s:.1f} s)")
    if not settings.background and settings.free_core:
        advice.append("background=True (a core is free for it)")
    if settings.background:
        where = (
            f"RSMs and scores {compute_s:.1f} s on the worker, training waited {wait_s:.1f} s "
            f"for it, logging {pictures_s:.1f} s"
        )
    else:
        where = (
            f"RSMs and scores {compute_s:.1f} s, pictures and logging {pictures_s:.1f} s on the "
            "training thread"
        )
    return (
        f"RSMMonitor: monitoring adds {blocked / interval_s:.0%} to training time (per "
        f"evaluation: probe forward {capture_s:.1f} s, {where}; training between two "
        f"evaluations: {interval_s:.1f} s). Any of these would bring it under {budget:.0%}: "
        f"{', '.join(advice)}."
    )


def _probe_ratio(capture_s: float, blocking_s: float, allowed_s: float) -> float | None:
    """The probe size ratio r < 1 with ``capture_s * r + blocking_s * r^2 = allowed_s``; None
    where nothing is allowed."""
    if allowed_s <= 0:
        return None
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


@dataclass(frozen=True)
class Spent:
    """Seconds one delivered evaluation held the training thread, by part.

    Attributes:
        evaluation_s: its ``rsm/time_s`` (probe forward plus RSMs and scores; on the worker
            when in the background).
        render_s: drawing its pictures (on the worker when in the background).
        report_s: handing its scores, pictures and RSMs to history, loggers and archive.
        wait_s: training's wait for it (background).
    """

    evaluation_s: float
    render_s: float = 0.0
    report_s: float = 0.0
    wait_s: float = 0.0


@dataclass
class Measured:
    """Seconds measured on the training thread during one fit (``RSMMonitor`` owns one).

    Attributes:
        start: ``time.perf_counter()`` when training started.
        captures: evaluations captured (probe forwards).
        capture_s: seconds of those probe forwards.
        spent: one :class:`Spent` per delivered evaluation, in order.
        warned: whether the cost warning was given in this fit.
    """

    start: float = 0.0
    captures: int = 0
    capture_s: float = 0.0
    spent: list[Spent] = field(default_factory=list)
    warned: bool = False


@dataclass(frozen=True)
class Costs:
    """A typical evaluation's seconds, as :func:`cost_advice` takes them."""

    capture_s: float
    compute_s: float
    wait_s: float
    interval_s: float
    pictures_s: float


def steady_costs(measured: Measured, background: bool, now: float) -> Costs | None:
    """What a typical evaluation costs the training thread, from two delivered evaluations on.

    The first evaluation is left out of the per-evaluation means: it compiles the solver (once
    per install, seconds), solves every pair cold and loads matplotlib's fonts. Its seconds
    still do not count as training: ``interval_s`` is the time since ``measured.start`` less
    all that the monitor held the training thread, per capture.

    Example:
        >>> m = Measured(start=0.0, captures=2, capture_s=0.5)
        >>> m.spent = [Spent(6.0, 2.0, 0.25), Spent(0.75, 1.0, 0.25)]  # the first compiled
        >>> steady_costs(m, background=False, now=14.25)
        Costs(capture_s=0.25, compute_s=0.5, wait_s=0.0, interval_s=2.0, pictures_s=1.25)
    """
    if len(measured.spent) < 2 or measured.captures == 0:
        return None
    steady = measured.spent[1:]

    def mean(part: str) -> float:
        return sum(getattr(spent, part) for spent in steady) / len(steady)

    capture = measured.capture_s / measured.captures
    if background:
        pictures = mean("report_s")
        held = measured.capture_s + sum(s.wait_s + s.report_s for s in measured.spent)
    else:
        pictures = mean("render_s") + mean("report_s")
        held = sum(s.evaluation_s + s.render_s + s.report_s for s in measured.spent)
    return Costs(
        capture_s=capture,
        compute_s=max(mean("evaluation_s") - capture, 0.0),
        wait_s=mean("wait_s"),
        interval_s=(now - measured.start - held) / measured.captures,
        pictures_s=pictures,
    )
