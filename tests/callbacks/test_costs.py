"""What monitoring costs: the advice by hand-made numbers, then the warnings, the progress line
and ``when_busy`` in real fits whose evaluations take seconds."""

from __future__ import annotations

import re
import threading
import warnings

import pytest
import torch
from helpers.fit import fit
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from test_background import WORKER, WideNet, wide_data
from torch.utils.data import DataLoader, TensorDataset

from lightning_rsm import RSMMonitor
from lightning_rsm.callbacks.costs import (
    Costs,
    Measured,
    Settings,
    Spent,
    cost_advice,
    steady_costs,
    worker_has_a_core,
)
from lightning_rsm.functional.pairs import available_cpus

SYNC = Settings(
    probe_size=500,
    probe_given=False,
    every_n=1,
    by_steps=False,
    max_positions=64,
    background=False,
    free_core=True,
)


def test_advice_brings_each_setting_to_the_budget():
    """1 s forward + 15 s RSMs every 20 s of training: 80%. Every 4th epoch: 16 / 80 = 20%;
    N' with 1 r + 15 r^2 = 5: r = (-1 + sqrt(301)) / 30 = 0.5450 -> 272; positions with
    15 s^3 = 4: s = 0.6437 -> 41."""
    message = cost_advice(1.0, 15.0, 0.0, 20.0, SYNC)
    assert "adds 80% to training time" in message
    assert "probe forward 1.0 s, RSMs and scores 15.0 s, pictures and logging 0.0 s" in message
    assert "every_n_epochs=4," in message
    assert "probe_size=272 " in message
    assert "max_positions=41," in message
    assert "background=True (a core is free" in message
    assert "\n" not in message


def test_advice_for_a_background_run_counts_the_wait_not_the_computation():
    settings = Settings(300, True, 50, True, None, True, False)
    # 0.5 s forward + 9.5 s waited for a 30 s computation, every 20 s of training: 50%
    message = cost_advice(0.5, 30.0, 9.5, 20.0, settings)
    assert "adds 50% to training time" in message
    assert "RSMs and scores 30.0 s on the worker, training waited 9.5 s for it" in message
    assert "every_n_train_steps=100," in message  # 50 * 10 / 5
    # 0.5 r + 9.5 r^2 = 5: r = (-0.5 + sqrt(190.25)) / 19 = 0.6996 -> 209
    assert "a probe of 209 samples" in message
    assert "max_positions=64 (now every position is kept)" in message
    assert "background=True" not in message


def test_pictures_count_and_turning_them_off_is_advised_where_it_suffices():
    """The demo on a quiet machine: RSMs 0.3 s, pictures 1.1 s, 2 s of training between
    evaluations: 70%. Pictures hardly depend on N or S, so neither a smaller probe nor fewer
    positions can bring it under 25% (0.5 s); log_images=False can (0.3 s)."""
    message = cost_advice(0.0, 0.3, 0.0, 2.0, SYNC, pictures_s=1.1)
    assert "adds 70% to training time" in message
    assert "RSMs and scores 0.3 s, pictures and logging 1.1 s on the training thread" in message
    assert "every_n_epochs=3," in message
    assert "log_images=False (pictures take 1.1 s)" in message
    assert "probe_size" not in message and "max_positions" not in message
    # RSMs alone over the budget: turning pictures off is not enough, so not advised
    assert "log_images" not in cost_advice(0.0, 0.8, 0.0, 2.0, SYNC, pictures_s=1.1)


def test_the_first_evaluation_is_left_out_of_the_costs():
    """It compiled the solver and solved every pair cold: 6 s, then 0.75 s. Its seconds are
    still not training time."""
    measured = Measured(start=0.0, captures=3, capture_s=0.75)
    assert steady_costs(measured, background=False, now=1.0) is None
    measured.spent = [Spent(6.0, 2.0, 0.25), Spent(0.75, 1.0, 0.25), Spent(0.75, 1.0, 0.25)]
    costs = steady_costs(measured, background=False, now=18.25)
    assert costs == Costs(0.25, 0.5, 0.0, 2.0, 1.25)  # (18.25 - 12.25) / 3 of training
    # in the background training is held by the captures, the waits and the logging only
    measured.spent = [Spent(6.0, 2.0, 0.25, 5.0), Spent(0.75, 1.0, 0.25, 0.5)]
    costs = steady_costs(measured, background=True, now=12.75)
    assert costs == Costs(0.25, 0.5, 0.5, 2.0, 0.25)  # (12.75 - 0.75 - 6.0) / 3


def test_no_advice_within_the_budget_or_for_short_evaluations():
    assert cost_advice(1.0, 4.0, 0.0, 20.0, SYNC) is None  # 25%: within
    assert cost_advice(0.1, 0.5, 0.0, 0.1, SYNC) is None  # 600%, but 0.6 s: no stall
    assert cost_advice(1.0, 4.1, 0.0, 20.0, SYNC) is not None


def test_worker_has_a_core_beside_training_threads():
    assert worker_has_a_core(cores=4, training_threads=3, solver_threads=1)
    assert not worker_has_a_core(cores=4, training_threads=4, solver_threads=1)
    assert not worker_has_a_core(cores=4, training_threads=2, solver_threads=3)


# ------------------------------------------------------------------ in a fit


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*wide_data(48)), batch_size=16)


def slow_monitor(samples: int = 18, **options) -> RSMMonitor:
    """``samples`` of 256 positions: 153 LAPs of 256 x 256 for 18, seconds on one thread."""
    return RSMMonitor(wide_data(samples, seed=1), ["conv"], max_positions=None, **options)


def cost_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "monitoring adds" in str(w.message)]


def test_a_slow_synchronous_monitor_warns_once_per_fit(tmp_path):
    # every evaluation cold, 276 LAPs on one thread: about 2 s, twice the least that warns
    monitor = slow_monitor(24, warm_start_bytes=0, solver_threads=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(WideNet(), loader(), monitor, tmp_path, max_epochs=4)
    assert len(monitor.history) == 4
    (message,) = cost_warnings(record)  # one warning, not one per evaluation
    assert "on the training thread" in message
    # training is far too short for a probe of 10 samples or more: none is suggested
    assert re.search(r"under 25%: every_n_epochs=\d+, max_positions=64 \(now every", message)


@pytest.mark.parametrize("progress", [True, False])
def test_training_waiting_for_the_worker_shows_it_and_counts_it(tmp_path, capfd, progress):
    """Epoch 1's evaluation waits for epoch 0's, and the fit's last one is waited for: a
    progress line on stderr while it waits (with the Trainer's bar on), and the waiting time in
    the cost warning."""
    monitor = slow_monitor(24, warm_start_bytes=0, background=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(WideNet(), loader(), monitor, tmp_path, max_epochs=2, enable_progress_bar=progress)
    err = capfd.readouterr().err
    line = "RSMMonitor: waiting for the evaluation of epoch 1 (step 6)"
    assert (line in err) is progress
    (message,) = cost_warnings(record)
    waited = float(re.search(r"training waited ([0-9.]+) s", message).group(1))
    assert waited > 0
    assert not [t for t in threading.enumerate() if t.name == WORKER]


@pytest.mark.parametrize("threads, warns", [(available_cpus(), True), (1, available_cpus() < 2)])
def test_a_worker_without_a_core_of_its_own_warns_at_fit_start(
    tmp_path, data, probe, threads, warns
):
    from conftest import TinyNet

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            monitor = RSMMonitor(probe, ["conv"], background=True)
            fit(TinyNet(), DataLoader(TensorDataset(*data), batch_size=16), monitor, tmp_path)
    finally:
        torch.set_num_threads(before)
    texts = [str(w.message) for w in record if "no core of its own" in str(w.message)]
    assert len(texts) == warns
    if warns:
        assert f"training uses {threads} torch threads" in texts[0]


def test_when_busy_skip_drops_evaluations_while_the_worker_computes(tmp_path):
    """An evaluation every step, each taking seconds: in the first epoch the steps come while
    the worker is busy and are skipped; those of the last epoch are all waited for."""
    monitor = slow_monitor(background=True, every_n_train_steps=1, when_busy="skip")
    with pytest.warns(UserWarning, match=r"skipped \d+ evaluation\(s\) .*epoch 0 \(step 2\)"):
        fit(WideNet(), loader(), monitor, tmp_path, max_epochs=2)
    evaluated = [row["step"] for row in monitor.history]
    skipped = [s["step"] for s in monitor.skipped]
    assert 1 in evaluated and 2 in skipped
    assert evaluated[-3:] == [4, 5, 6]  # the last epoch waits
    assert sorted(evaluated + skipped) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"when_busy": "queue"}, r"`when_busy` to be one of \['skip', 'wait'\], but got 'queue'"),
        ({"when_busy": "skip"}, r"`when_busy='skip'` only with `background=True`"),
    ],
)
def test_when_busy_is_checked(options, match):
    with pytest.raises(MisconfigurationException, match=match):
        RSMMonitor(layers=["conv"], **options)
