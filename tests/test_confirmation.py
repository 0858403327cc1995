"""The confirmation stage: the search's best configurations and the default re-trained on fresh seeds."""

import json
import math
import os
import signal

import pytest
import yaml

import ssl_tune
from ssl_tune import tracking
from ssl_tune.searching import confirmation
from ssl_tune.searching.confirmation import Interval, confirmation_points, summarise
from ssl_tune.searching.racing import DEFAULT, RaceRules, replay
from ssl_tune.searching.space import CONFIRMATION_KEY, resolve_trial
from ssl_tune.spec import SpecError
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import output, run_cli, runs_of, search_spec, start_cli, wait_for


def _spec(**confirm):
    raw = search_spec(confirm=confirm)
    raw["search"].update(metric="knn_top1", mode="max")
    return spec_from_dict(raw)


def test_points_are_the_top_k_trials_by_the_one_rule_then_the_default():
    spec = _spec(top_k=2, seeds=3)
    rows = [{"trial_id": "a", "run_id": "ra", "objective": 70.0, "status": "finished"},
            {"trial_id": "b", "run_id": "rb", "objective": 90.0, "status": "failed"},  # a failed run is no result
            {"trial_id": "c", "run_id": "rc", "objective": 75.0, "status": "stopped"},
            {"trial_id": "d", "run_id": "rd", "objective": 60.0, "status": "finished"}]
    points = confirmation_points(spec, rows, {t: {"method.tau": i + 0.5} for i, t in enumerate("abcd")})
    assert [of for of, _ in points] == ["rc", "ra", DEFAULT]
    assert points[0][1] == {"method.tau": 2.5}
    assert points[-1][1] == {"method.lam2": 1.25, "method.tau": 1.0}  # the ranges' defaults
    # a confirmation trial trains its configuration on its own seed, a fresh one
    rules = RaceRules.of_spec(spec, 2)
    assert rules.seeds == (1, 2, 3) and rules.looks == [2, 3]
    resolved = resolve_trial(spec, {CONFIRMATION_KEY: {"of": "ra", "values": points[1][1], "seed": 2}})
    assert resolved.training.seed == 2 and resolved.method.tau == 0.5
    assert not confirmation_points(_spec(top_k=1, seeds=2, default=False), rows[:0], {})


def test_the_table_has_each_configurations_interval_and_the_races_gain_and_departures():
    interval = Interval.of([1.0, 2.0, 3.0])
    assert (interval.mean, interval.sd) == (2.0, 1.0)
    assert interval.high - interval.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2 dof)
    objectives = {DEFAULT: {1: 70.0, 2: 70.2, 3: 69.8}, "r1": {1: 72.0, 2: 72.2, 3: 71.8}, "r2": {1: 60.0, 2: math.nan}}
    race = replay(RaceRules(2, (1, 2, 3)), ["r1", "r2"], objectives)
    rows = summarise(objectives, race)
    assert [r["confirms"] for r in rows] == ["r1", DEFAULT, "r2"]
    r1 = rows[0]
    assert r1["gain_over_default"] == pytest.approx(2.0) and r1["gain_low"] > 0 and r1["beats_default"] is True
    assert rows[2]["seeds"] == 1 and math.isnan(rows[2]["sd"])  # a failed seed does not count
    assert rows[2]["left_race"] == "round 1: no run finished" or rows[2]["left_race"].startswith("round 1: below")
    assert race.verdict().startswith("the winner beats the default beyond seed noise after 3 of at most 3 seeds: +2.00")
    # minimising: a lower objective is the gain
    low = replay(RaceRules(1, (1, 2), mode="min"), ["r1"], {DEFAULT: {1: 2.0, 2: 3.0}, "r1": {1: 1.0, 2: 2.5}})
    assert low.final is not None and low.final.gain == pytest.approx(0.75)
    assert low.verdict().startswith("undecided at 2 seeds: +0.75")


def test_confirm_fields_are_validated_with_the_field_named():
    with pytest.raises(SpecError, match=r"search.confirm.seeds: Input should be greater than or equal to 2"):
        _spec(top_k=1, seeds=1)
    with pytest.raises(SpecError, match=r"search.confirm.top_k"):
        _spec(top_k=-1)


@pytest.mark.ray
@pytest.mark.slow
def test_search_with_confirmation_end_to_end_on_the_label_free_objective(tmp_path, cli_here):
    """A search on RankMe whose confirmation stage is interrupted (Ctrl-C) and resumed, then read back."""
    # Confirmation trials of 3 epochs on half the images: Ctrl-C lands while the last two train.
    raw = search_spec(confirm={"top_k": 1, "seeds": 2, "overrides": {"training.epochs": 3, "data.subset": 0.5}},
                      max_concurrent=2)
    raw["search"].update(metric="rankme", mode="max")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")

    def last_round_of_confirmation():
        # Every confirmation trial has started (2 at a time, 4 in all): Tune counts the running ones
        # TERMINATED on Ctrl-C, so a count of trials took the stage for finished.
        _, parents, _ = runs_of(tmp_path)
        runs = tracking.child_runs(client, parents[0], tracking.KIND_CONFIRMATION) if parents else []
        running = [c for c in runs if c.info.status == "RUNNING"]
        return (sum(c.info.status == "FINISHED" for c in runs) == 2 and len(running) == 2
                and any(c.data.metrics.get("epoch", 0) >= 1 for c in running))

    run = start_cli(["run", "spec.yaml", "--name", "c1"], cwd=tmp_path)
    wait_for(last_round_of_confirmation, 400, "the last two confirmation trials", run)
    os.kill(run.pid, signal.SIGINT)
    run.wait(timeout=120)
    assert run.returncode == 130, output(run)[-3000:]
    assert "search interrupted in its confirmation stage, after 2 finished confirmation trial(s)" in output(run)
    parent = tracking.find_parent_run(client, "c1")
    assert parent.info.status == "KILLED" and parent.data.tags[tracking.TAG_STAGE] == tracking.KIND_CONFIRMATION
    proc = run_cli(["resume", "c1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = tracking.find_parent_run(client, "c1")
    assert parent.info.status == "FINISHED" and parent.data.tags["ssl_tune.resumed"] == "1"
    trials = tracking.leaderboard(client, parent)
    confirmations = tracking.child_runs(client, parent, tracking.KIND_CONFIRMATION)
    assert len(trials) == 3 and len(confirmations) == 4
    best_trial_run = trials[0]["run_id"]
    assert sorted((c.data.tags[tracking.TAG_CONFIRMS], c.data.tags[tracking.TAG_SEED]) for c in confirmations) == \
        sorted((of, seed) for of in (best_trial_run, DEFAULT) for seed in ("1", "2"))
    header = next(line for line in output(run).splitlines() if line.startswith("trial "))  # the console's table
    assert parent.data.tags[tracking.TAG_METRIC] == "rankme" and "rankme" in header.split()
    for c in confirmations:  # each trained its epochs once, across the interruption
        assert [m.step for m in client.get_metric_history(c.info.run_id, "epoch")] == [1, 2, 3]
        assert c.info.status == "FINISHED" and c.data.params["training.seed"] == c.data.tags[tracking.TAG_SEED]
        assert c.data.params["training.epochs"] == "3"  # the confirmation's own setting
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    confirmed_lam2 = {c.data.params["method.lam2"] for c in confirmations
                      if c.data.tags[tracking.TAG_CONFIRMS] == best_trial_run}
    assert confirmed_lam2 == {client.get_run(best_trial_run).data.params["method.lam2"]}

    # the table: mean, SD and 95% interval per configuration, the paired gain, the verdict
    table = tracking.confirmation_table(client, parent)
    assert {r["confirms"] for r in table} == {best_trial_run, DEFAULT}
    for row in table:
        values = [c.data.metrics["rankme"] for c in confirmations if c.data.tags[tracking.TAG_CONFIRMS] == row["confirms"]]
        assert row["mean"] == pytest.approx(sum(values) / 2) and row["ci95_low"] < row["mean"] < row["ci95_high"]
    winner = confirmation.winner(table)
    verdict = parent.data.tags[tracking.TAG_VERDICT]
    assert "confirmed on fresh seeds" in proc.stdout and verdict in proc.stdout and "2 seeds" in verdict
    assert parent.data.metrics["confirmed_mean"] == pytest.approx(winner["mean"])
    assert "default_mean" in parent.data.metrics
    if winner["confirms"] != DEFAULT:
        assert parent.data.tags[tracking.TAG_BEATS_DEFAULT] == str(winner["beats_default"]).lower()
    assert "figures/confirmation.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    found = ssl_tune.open_search("c1", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # the Python API agrees
    assert found.best.confirmed and found.best.run_id == winner["run_id"]
    assert list(found.confirmation["mean"]) == [r["mean"] for r in table] and found.verdict == verdict
    status, results, _ = cli_here("results", "c1")
    assert status == 0 and "ci95_low" in results and "search #1" in results
    listed = cli_here("list")[1].splitlines()
    header, row = listed[1].split(), listed[2].split()
    assert row[header.index("confirmed") + 1] == f"{winner['mean']:.4g}"  # +1: "started" is a date and a time

    # export takes the confirmed winner's best seed, and says so in metrics.json
    winner_runs = [c for c in confirmations if c.data.tags[tracking.TAG_CONFIRMS] == winner["confirms"]]
    best_seed = max(winner_runs, key=lambda c: c.data.metrics["rankme"])
    assert parent.data.tags[tracking.TAG_BEST_TRIAL_RUN] == best_seed.info.run_id == winner["run_id"]
    status, _, err = cli_here("export", "c1", "--out", "best")
    assert status == 0, err
    info = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert info["run_id"] == best_seed.info.run_id
    assert info["metrics"]["rankme"] == best_seed.data.metrics["rankme"] == parent.data.metrics["best_rankme"]
    # labels exist, so kNN is still evaluated and logged beside the label-free objective
    assert all("knn_top1" in c.data.metrics for c in confirmations) and "best_knn_top1" in parent.data.metrics
