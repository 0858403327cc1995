"""The console's trial table: its time-left estimate counts epochs, not start-ups or restarts, follows ASHA's
promotions and adds the stages after this one. In-process, on a clock the test sets."""

import pytest

from ssl_tune.spec.files import spec_from_dict
from tests.conftest import FakeTrial, tiny_spec_dict


def console_table(monkeypatch, epochs: int, num_samples: int, **search):
    """A ConsoleTable on a clock the test sets (`now[0]`), printing into `rows`."""
    from ssl_tune.report import console

    spec = spec_from_dict({**tiny_spec_dict(training={"epochs": epochs, "batch_size": 32, "seed": 0}),
                           "search": {"num_samples": num_samples, "metric": "loss", "mode": "min", **search}})
    table, rows, now = console.ConsoleTable(spec), [], [0.0]
    monkeypatch.setattr(table, "_print", rows.append)
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    return table, rows, now


def test_eta_counts_epochs_not_restarts(monkeypatch):
    table, rows, now = console_table(monkeypatch, epochs=10, num_samples=1, scheduler="none")
    trial = FakeTrial("t1", {})
    table.on_trial_start(0, [], trial)
    for epoch, at in [(1, 30.0), (2, 40.0), (3, 50.0)]:  # 30 s to start, then 10 s an epoch
        now[0] = at
        table.on_trial_result(0, [], trial, {"epoch": float(epoch), "loss": 1.0})
    assert rows[1].split()[-1] == "-"  # no estimate before one epoch was measured
    assert rows[-1].split()[-1] == "1m10s"  # 7 epochs left at 10 s
    now[0] = 55.0
    trial.last_result = {"epoch": 3.0}
    table.on_trial_recover(0, [], trial)
    table.on_trial_start(0, [], trial)
    now[0], trial.last_result = 200.0, {}  # a long restart
    table.on_trial_result(0, [], trial, {"epoch": 4.0, "loss": 1.0})
    assert rows[-1].split()[-1] == "1m00s"  # still 10 s an epoch


def test_eta_does_not_jump_when_one_of_two_trials_ends(monkeypatch):
    table, rows, now = console_table(monkeypatch, epochs=4, num_samples=4, scheduler="none")
    a, b = FakeTrial("a", {}), FakeTrial("b", {})
    table.on_trial_start(0, [], a)
    table.on_trial_start(0, [], b)
    for at in (10.0, 20.0):  # two trials side by side, 10 s an epoch each
        now[0] = at
        table.on_trial_result(0, [], a, {"epoch": at / 10, "loss": 1.0})
        table.on_trial_result(0, [], b, {"epoch": at / 10, "loss": 1.0})
    before = rows[-1].split()[-1]
    a.last_result = {"epoch": 2.0, "loss": 1.0}
    table.on_trial_complete(0, [], a)  # stopped early: its 2 other epochs never run
    assert before == "1m00s" and rows[-1].split()[-1] == "50s"  # (16 - 6 settled) x 10 s / 2 at once


def test_eta_under_asha_counts_the_epochs_trials_are_expected_to_run(monkeypatch):
    """16 trials of 8 epochs, ASHA rungs at 1 and 3, 1 in 3 promoted: about 36 epochs, not 128; the
    estimate then follows the promotions that happened, and adds the stages after this one."""
    from ssl_tune.searching import budget

    table, rows, now = console_table(monkeypatch, epochs=8, num_samples=16, grace_period=1, reduction_factor=3)
    spec = table.spec
    assert budget.rungs(spec) == [1, 3]
    assert budget.expected_epochs_left(spec, 0) == pytest.approx(1 + 2 / 3 + 5 / 9)
    assert budget.expected_epochs_left(spec, 2) == pytest.approx(1 + 5 / 3)  # to rung 3, then 1 in 3 goes on
    assert budget.expected_epochs_left(spec, 3) == pytest.approx(5)  # still running at rung 3: promoted, to the end
    trial = FakeTrial("a", {})
    table.on_trial_start(0, [], trial)
    now[0] = 30.0
    table.on_trial_result(0, [], trial, {"epoch": 1.0, "loss": 1.0})
    assert rows[-1].split()[-1] == "-"  # the first epoch includes the start-up: not measured
    now[0] = 40.0
    table.on_trial_result(0, [], trial, {"epoch": 2.0, "loss": 1.0})  # 10 s an epoch
    rates = budget.promotion_rates(spec, {"a": 2}, set())  # one trial went on at rung 1
    assert rates[0] == pytest.approx((1 + 2 / 3) / 3) and rates[1] == pytest.approx(1 / 3)
    expected = budget.expected_epochs_left(spec, 2, rates) + 15 * budget.expected_epochs_left(spec, 0, rates)
    assert table.epochs_left() == pytest.approx(expected) and expected < 0.5 * (6 + 15 * 8)
    minutes, seconds = divmod(round(expected * 10), 60)
    assert rows[-1].split()[-1] == f"{minutes}m{seconds:02d}s"
    table.epochs_after = 72  # the confirmation stage's 9 trials of 8 epochs
    assert table.epochs_left() == pytest.approx(expected + 72)
