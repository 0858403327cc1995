"""The confirmation stage as a race (`ssl_tune.searching.racing`): its record opened on the parent run, each round's
runs (reused from the tracking store where a finished one has the same identity), and each round's Tuner.

The driver (`ssl_tune.searching.driver`) runs the rounds: `next_round` says what the next one trains, after
recording what it reuses; `round_tuner` trains the rest, as ordinary trials, in parallel, logged as child runs
of the same parent. The race itself is never saved: it is replayed from the runs (`tracking.race_record`).
"""

from __future__ import annotations

import sys
from typing import Any

from ssl_tune import tracking
from ssl_tune.searching.racing import DEFAULT, Race, RaceRules
from ssl_tune.searching.space import CONFIRMATION_KEY
from ssl_tune.searching.stage import CONFIRM_FOLDER, Stage, confirmation_dirname
from ssl_tune.searching.warm_start import setting
from ssl_tune.tracking import race_record


def open_race(stage: Stage, points: list[tuple[str, dict[str, Any]]]) -> None:
    """Record the race's rules and configurations on the parent, and say what the stage will do."""
    spec, searched = stage.spec, stage.search_spec or stage.spec
    confirm = spec.search.confirm
    rules = RaceRules.of_spec(spec, sum(of != DEFAULT for of, _ in points))
    race_record.write_race(stage.client, stage.parent_id, rules, points)
    at = f", at {', '.join(f'{p} {v}' for p, v in searched.search.confirm.overrides.items())}" \
        if searched.search.confirm.overrides else ""
    seeds = (f"raced on {rules.looks[0]} to {confirm.seeds} fresh seeds, one more a round" if len(rules.looks) > 1
             else f"re-trained on {confirm.seeds} fresh seeds")
    print(f"\nconfirmation: the {rules.challengers} best configuration(s){' and the default' if confirm.default else ''} "
          f"{seeds} ({spec.training.epochs} epochs a run{at})", file=sys.__stdout__, flush=True)


def race_so_far(stage: Stage, attempted: set[tuple[str, int]]) -> Race:
    """The race replayed from this search's confirmation runs; a run this driver's Tuner tried that left no record
    (its trial failed before its MLflow run was made) counts as failed, so the race goes on without it."""
    parent = stage.client.get_run(stage.parent_id)
    runs = tracking.child_runs(stage.client, parent, tracking.KIND_CONFIRMATION)
    return race_record.race_of(stage.client, parent, runs, stage.spec.search.metric, stage.spec.search.mode, attempted)


def next_round(stage: Stage, race: Race, attempted: set[tuple[str, int]]) -> list[dict[str, Any]]:
    """The confirmation configs ({of, values, seed, round, identity}) the race's next round still has to train:
    its runs that are not in this search's record, less those reused from the store (recorded here, as runs
    linked to the ones that trained them). `attempted`: runs an earlier Tuner of this driver tried and left no
    record of; they are not tried again."""
    saved = race_record.read_race(stage.client, stage.client.get_run(stage.parent_id))
    values = dict(saved[1]) if saved else {}
    fields = setting(stage.spec)
    present = race_record.objectives_of(tracking.child_runs(stage.client, stage.client.get_run(stage.parent_id),
                                                              tracking.KIND_CONFIRMATION), stage.spec.search.metric)
    configs: list[dict[str, Any]] = [
        {"of": of, "values": values[of], "seed": seed, "round": race.rounds + 1,
         "identity": race_record.run_identity(fields, values[of], seed)}
        for of, seed in race.next_round() if seed not in present.get(of, {}) and (of, seed) not in attempted]
    if not stage.spec.search.confirm.reuse or not configs:
        _print_round(race, len(configs))
        return configs
    found = race_record.reusable(stage.client, [str(c["identity"]) for c in configs], stage.parent_id,
                                 stage.spec.search.metric)
    for config in configs:
        if config["identity"] in found:
            race_record.record_reused(stage.client, stage.experiment_id, stage.parent_id, config, found[config["identity"]])
    if found:
        print(f"confirmation round {race.rounds + 1}: {len(found)} run(s) reused from the tracking store",
              file=sys.__stdout__, flush=True)
    remaining = [c for c in configs if c["identity"] not in found]
    _print_round(race, len(remaining))
    return remaining


def _print_round(race: Race, runs: int) -> None:
    """One line as a round starts: who is still in the race, who left and why."""
    left = "; ".join(f"{of[:8]} left in round {r} ({why})" for of, (r, why) in race.left.items())
    seeds = race.rules.looks[race.rounds]
    print(f"confirmation round {race.rounds + 1}: {len(race.in_race)} configuration(s) in the race"
          f"{' and the default' if race.rules.default else ''}, up to {seeds} seeds; {runs} run(s) to train"
          + (f"; {left}" if left else ""), file=sys.__stdout__, flush=True)


def round_tuner(stage: Stage, configs: list[dict[str, Any]]):
    """One round's Tuner: every config (a configuration and a fresh seed) an ordinary trial, in parallel, at the
    full budget and without early stopping. The parent names its directory, so `ssl-tune resume` continues it."""
    from ray import tune

    from ssl_tune.report.console import ConsoleTable

    name = f"{stage.folder}{CONFIRM_FOLDER}-r{configs[0]['round']}"
    stage.client.set_tag(stage.parent_id, tracking.TAG_STORAGE, str(stage.storage / name))
    stage.client.set_tag(stage.parent_id, tracking.TAG_CONFIRMATION_TRIALS, str(len(configs)))
    return stage.tuner(
        name,
        tune.TuneConfig(num_samples=1, max_concurrent_trials=min(stage.max_concurrent, len(configs)),
                        reuse_actors=True, trial_dirname_creator=confirmation_dirname),
        ConsoleTable(stage.spec, num_samples=len(configs), early_stopping=False),
        param_space={CONFIRMATION_KEY: tune.grid_search(configs)})
