"""The racing confirmation: configurations below the leader leave, a decided verdict stops the race, the null case
claims no gain; end to end, rounds of Tune trials, finished runs reused from the store, and a resume between
rounds. The end-to-end searches race `twist_offset` (tests/methods/twist_offset.py), whose loss the test sets."""

import os
import random
import signal
from collections import Counter

import pytest
import yaml

import ssl_tune
from ssl_tune import tracking
from ssl_tune.searching.racing import BEATS, DEFAULT, FUTILE, ONE_LEFT, UNDECIDED, Race, RaceRules, replay
from ssl_tune.tracking import race_record
from tests.conftest import (SMALL_SUBSET, TEST_METHODS, output, run_cli, search_spec, start_cli, tiny_spec_dict,
                            wait_for)

METHOD_PATH_ENV = "SSL_TUNE_METHOD_PATH"


def _noisy(offset: float, seeds) -> dict[int, float]:
    """What `twist_offset` reports: `offset`, +0.1 on odd seeds and -0.1 on even ones."""
    return {s: offset + (0.1 if s % 2 else -0.1) for s in seeds}


def _minimising(challengers: int, seeds: int = 6, **rules) -> RaceRules:
    return RaceRules(challengers, tuple(range(1, seeds + 1)), mode="min", **rules)


def test_a_challenger_below_the_leader_leaves_and_a_decided_verdict_stops_the_race_early():
    race = Race(_minimising(2), ["a", "b"])
    assert race.next_round() == [(of, s) for s in (1, 2) for of in ("a", "b", DEFAULT)]
    race.observe({"a": _noisy(1, [1, 2]), "b": _noisy(3, [1, 2]), DEFAULT: _noisy(2, [1, 2])})
    # b is 2 below the leader with a noise SD of 0.14: out; a's gain of 1 is not yet beyond the first look's bound
    assert race.left == {"b": (1, "below the leader")} and not race.done
    assert race.next_round() == [("a", 3), (DEFAULT, 3)]
    race.observe({"a": _noisy(1, [1, 2, 3]), "b": _noisy(3, [1, 2]), DEFAULT: _noisy(2, [1, 2, 3])})
    assert race.decision == BEATS and race.rounds == 2 and race.next_round() == []  # 3 of at most 6 seeds
    assert race.final is not None and race.final.of == "a" and race.final.gain == pytest.approx(1.0)
    assert race.verdict().startswith("the winner beats the default beyond seed noise after 3 of at most 6 seeds: +1.00")
    # below the default beyond noise: out, even while the leader is not
    race = Race(_minimising(2), ["a", "b"])
    race.observe({"a": _noisy(2.02, [1, 2]), "b": _noisy(3, [1, 2]), DEFAULT: _noisy(2, [1, 2])})
    assert race.left["b"][1] in ("below the leader", "below the default")


def test_the_null_case_claims_no_gain():
    # every configuration the default's: the leader's gain is noise, and the race ends without a claim
    race, objectives = Race(_minimising(2), ["a", "b"]), {"a": {}, "b": {}, DEFAULT: {}}
    while not race.done:
        for of, seed in race.next_round():
            objectives[of].update(_noisy(2, [seed]))
        race.observe(objectives)
    assert race.decision in (FUTILE, UNDECIDED) and not race.left and "beats" not in race.verdict()
    # and over 400 simulated null races at the measured noise, at most the race's 5 % of false claims
    rng, claims = random.Random(1), 0
    for _ in range(400):
        race, objectives = Race(RaceRules(2, tuple(range(1, 9))), ["a", "b"]), {"a": {}, "b": {}, DEFAULT: {}}
        while not race.done:
            for of, seed in race.next_round():
                objectives[of][seed] = rng.gauss(77.0, 0.7)
            race.observe(objectives)
        claims += race.decision == BEATS
    assert claims / 400 <= 0.05


def test_fixed_seeds_are_one_look_and_the_levels_spend_alpha_once():
    racing = RaceRules(2, tuple(range(1, 9)))
    assert racing.looks == [2, 3, 4, 5, 6, 7, 8]
    assert sum(racing.claim_level(i) for i in range(7)) * 2 == pytest.approx(0.05)  # over looks and challengers
    fixed = RaceRules(2, (1, 2, 3), racing=False)
    assert fixed.looks == [3] and fixed.claim_level(0) == pytest.approx(0.025)
    race = Race(fixed, ["a", "b"])
    assert len(race.next_round()) == 9
    race.observe({"a": _noisy(3, [1, 2, 3]), "b": _noisy(3.1, [1, 2, 3]), DEFAULT: _noisy(2, [1, 2, 3])})
    assert race.done and not race.left  # one look: no one leaves
    # without the default, the race ends with one left
    alone = Race(_minimising(2, default=False), ["a", "b"])
    alone.observe({"a": _noisy(1, [1, 2]), "b": _noisy(3, [1, 2])})
    assert alone.decision == ONE_LEFT and alone.in_race == ["a"]


def test_a_race_replayed_from_its_runs_is_the_race_that_ran():
    rules = _minimising(2)
    objectives = {"a": _noisy(1, [1, 2, 3]), "b": _noisy(3, [1, 2]), DEFAULT: _noisy(2, [1, 2, 3])}
    replayed = replay(rules, ["a", "b"], objectives)
    assert (replayed.decision, replayed.rounds, replayed.left) == (BEATS, 2, {"b": (1, "below the leader")})
    # a round whose runs are not all there is the one to train
    partial = replay(rules, ["a", "b"], {"a": _noisy(1, [1, 2, 3]), "b": _noisy(3, [1, 2]), DEFAULT: _noisy(2, [1, 2])})
    assert partial.rounds == 1 and partial.next_round() == [("a", 3), (DEFAULT, 3)]


def test_a_run_identity_is_its_setting_values_and_seed():
    setting = {"training.epochs": 2, "data.subset": 0.2, "training.seed": 0}
    same = race_record.run_identity(setting, {"method.offset": 2.0}, 1)
    assert same == race_record.run_identity({**setting, "training.seed": 5}, {"method.offset": 2.0}, 1)  # (the base)
    assert same != race_record.run_identity({**setting, "training.epochs": 3}, {"method.offset": 2.0}, 1)
    assert same != race_record.run_identity(setting, {"method.offset": 2.5}, 1)
    assert same != race_record.run_identity(setting, {"method.offset": 2.0}, 2)


# --- end to end ------------------------------------------------------------------------------------


def offset_search(num_samples: int, offsets: list[float], **confirm) -> dict:
    """A search of `twist_offset`'s offset (default 2.0) on the loss, 1 epoch a trial, its points first."""
    raw = search_spec(num_samples=num_samples, scheduler="none", max_concurrent=2,
                      points_to_evaluate=[{"method.offset": o} for o in offsets],
                      confirm={"top_k": num_samples, "seeds": 6, **confirm})
    raw["method"] = {**tiny_spec_dict()["method"], "name": "twist_offset",
                     "offset": {"type": "uniform", "low": 0.5, "high": 3.5, "default": 2.0}}
    raw["training"]["epochs"], raw["data"] = 1, {"subset": SMALL_SUBSET}
    return raw


def _env() -> dict:
    return {METHOD_PATH_ENV: TEST_METHODS}


def _confirmations(client, name: str) -> list:
    return tracking.child_runs(client, tracking.find_parent_run(client, name), tracking.KIND_CONFIRMATION)


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    """Two searches of one setting in one store: the first races offsets 1 and 3 against the default 2 (3 is out
    after round 1, 1 beats the default after round 2); the second has offsets 1 and 1.5."""
    work = tmp_path_factory.mktemp("race")
    (work / "first.yaml").write_text(yaml.safe_dump(offset_search(2, [1.0, 3.0])))
    second = offset_search(2, [1.0, 1.5])
    second["search"]["seed"] = 7  # another search, same setting
    (work / "second.yaml").write_text(yaml.safe_dump(second))
    procs = [run_cli(["run", f"{name}.yaml", "--name", name], cwd=work, env=_env()) for name in ("first", "second")]
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, tracking.client_for(f"sqlite:///{work}/mlflow.db"), procs


@pytest.mark.ray
@pytest.mark.slow
def test_a_raced_confirmation_drops_the_worse_and_stops_once_decided(raced, cli_here):
    work, client, (first, _) = raced
    parent = tracking.find_parent_run(client, "first")
    runs = _confirmations(client, "first")
    by_offset = Counter((r.data.params["method.offset"], r.data.tags[tracking.TAG_ROUND]) for r in runs)
    assert by_offset == {("1.0", "1"): 2, ("3.0", "1"): 2, ("2.0", "1"): 2, ("1.0", "2"): 1, ("2.0", "2"): 1}
    assert all(r.info.status == "FINISHED" and r.data.params["training.seed"] == r.data.tags[tracking.TAG_SEED]
               for r in runs)
    assert parent.data.params["confirm.rounds"] == "2" and parent.data.params["confirm.runs_trained"] == "8"
    assert parent.data.params["confirm.runs_reused"] == "0" and parent.info.status == "FINISHED"
    verdict = parent.data.tags[tracking.TAG_VERDICT]
    assert verdict.startswith("the winner beats the default beyond seed noise after 3 of at most 6 seeds: +1.00")
    assert verdict in first.stdout and parent.data.tags[tracking.TAG_BEATS_DEFAULT] == "true"
    # the table says who left and why, in results, the API and the figure
    found = ssl_tune.open_search("first", tracking_uri=f"sqlite:///{work}/mlflow.db")
    table = found.confirmation.set_index("method.offset")
    assert table.loc[3.0, "left_race"] == "round 1: below the leader" and table.loc[1.0, "left_race"] == ""
    assert list(table.loc[[1.0, 3.0, 2.0], "seeds"]) == [3, 2, 3] and bool(table.loc[1.0, "beats_default"])
    status, results, _ = cli_here("results", "first", cwd=work)
    assert status == 0 and "round 1: below the leader" in results and verdict in results
    assert "figures/confirmation.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_search_of_the_setting_reuses_exactly_the_matching_runs(raced, monkeypatch):
    work, client, (_, second) = raced
    first_runs = {r.info.run_id: r for r in _confirmations(client, "first")}
    runs = _confirmations(client, "second")
    reused = [r for r in runs if tracking.TAG_REUSED_FROM in r.data.tags]
    trained = [r for r in runs if tracking.TAG_REUSED_FROM not in r.data.tags]
    # the default's and offset 1's seeds the first search has are reused, linked to the run that trained them;
    # offset 1.5 is new, and so is every seed the first search did not train
    assert not [r for r in trained if r.data.tags[tracking.TAG_CONFIRMS] == DEFAULT
                and int(r.data.tags[tracking.TAG_SEED]) <= 3]
    assert {r.data.params["method.offset"] for r in trained if int(r.data.tags[tracking.TAG_SEED]) <= 2} == {"1.5"}
    for run in reused:
        source = first_runs[run.data.tags[tracking.TAG_REUSED_FROM]]
        assert source.data.tags[tracking.TAG_IDENTITY] == run.data.tags[tracking.TAG_IDENTITY]
        assert run.data.metrics["loss"] == source.data.metrics["loss"]
    parent = tracking.find_parent_run(client, "second")
    assert parent.data.params["confirm.runs_reused"] == str(len(reused)) and len(reused) >= 4
    assert parent.data.params["confirm.runs_trained"] == str(len(trained))
    assert "run(s) reused from the tracking store" in second.stdout
    # another setting matches nothing in the store
    from ssl_tune.searching.warm_start import setting
    from ssl_tune.spec.files import spec_from_dict

    other = offset_search(2, [1.0, 3.0])
    other["training"]["epochs"] = 2
    monkeypatch.setenv(METHOD_PATH_ENV, TEST_METHODS)
    fields = setting(spec_from_dict(other))
    identities = [race_record.run_identity(fields, {"method.offset": v}, s) for v in (1.0, 2.0) for s in (1, 2)]
    assert race_record.reusable(client, identities, "", "loss") == {}


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_between_rounds_then_resume_trains_every_remaining_run_once(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(offset_search(1, [1.0], reuse=False)))
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")

    def first_round_done() -> bool:
        parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     filter_string=f"tags.`{tracking.TAG_KIND}` = 'search'")
        runs = tracking.child_runs(client, parents[0], tracking.KIND_CONFIRMATION) if parents else []
        return sum(r.info.status == "FINISHED" for r in runs) >= 4

    run = start_cli(["run", "spec.yaml", "--name", "r1"], cwd=tmp_path, env=_env())
    wait_for(first_round_done, 400, "the race's first round", run)
    os.kill(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    assert run.returncode != 0 and tracking.find_parent_run(client, "r1").info.status == "KILLED", output(run)[-3000:]
    proc = run_cli(["resume", "r1"], cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parent = tracking.find_parent_run(client, "r1")
    runs = _confirmations(client, "r1")
    pairs = Counter((r.data.tags[tracking.TAG_CONFIRMS], r.data.tags[tracking.TAG_SEED]) for r in runs)
    assert set(pairs.values()) == {1} and all(r.info.status == "FINISHED" for r in runs)  # each run once
    for r in runs:  # each trained its one epoch once
        assert [m.step for m in client.get_metric_history(r.info.run_id, "epoch")] == [1]
    # the same race as without the stop: one challenger against the default, decided after a few rounds
    race = race_record.race_of(client, parent, runs, "loss", "min")
    assert race.decision == BEATS and parent.data.params["confirm.rounds"] == str(race.rounds) and race.rounds >= 2
    assert len(runs) == 2 * race.rules.looks[race.rounds - 1] and parent.info.status == "FINISHED"
