"""The racing confirmation's record (`ssl_tune.searching.racing`): the race's rules and configurations on the
parent run, the race read back from its confirmation runs, and finished runs reused from anywhere in the store.

Nothing of the race is kept but its runs: `race_of` replays it from the confirmation runs the store holds, so
`ssl-tune resume`, `results` and the API see the same race the driver ran.

**Reuse.** A confirmation run is identified by `run_identity`: its configuration's full setting (every field
that decides what it measures, `warm_start.setting`, with the configuration's values), its training seed and
the ssl-tune version. A FINISHED confirmation run with the same identity anywhere in the store is counted
instead of trained again: this search gets a child run that links to it (`TAG_REUSED_FROM`) and copies its
params and metrics. Only confirmation runs carry an identity: a search trial was chosen by its score, so
reusing one would bias the comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ssl_tune.searching.racing import DEFAULT, Race, RaceRules, replay
from ssl_tune.tracking.store import log_metrics, log_params
from ssl_tune.tracking.tags import (KIND_CONFIRMATION, TAG_CONFIRMS, TAG_IDENTITY, TAG_KIND, TAG_REUSED_FROM, TAG_ROUND,
                                    TAG_SEED)

RACE_ARTIFACT = "race.json"
NOT_IN_IDENTITY = ("training.seed",)  # the run's own seed is in the identity; the search's base seed is not


def run_identity(setting: dict[str, Any], values: dict[str, Any], seed: int) -> str:
    """What makes two confirmation runs the same run: `setting` (the confirmation spec's `warm_start.setting`)
    with the configuration's `values`, the seed and the ssl-tune version."""
    from ssl_tune import __version__

    fields = {k: v for k, v in {**setting, **values}.items() if k not in NOT_IN_IDENTITY}
    text = json.dumps({"fields": fields, "seed": seed, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def write_race(client, parent_id: str, rules: RaceRules, points: list[tuple[str, dict[str, Any]]]) -> None:
    """The race's rules and its configurations' values (`points`: (what it confirms, values); the default last)."""
    client.log_dict(parent_id, {"rules": dataclasses.asdict(rules), "points": [[of, values] for of, values in points]},
                    RACE_ARTIFACT)


def read_race(client, parent) -> tuple[RaceRules, list[tuple[str, dict[str, Any]]]] | None:
    """`write_race`'s record; None for a search confirmed before racing (no record)."""
    if not any(f.path == RACE_ARTIFACT for f in client.list_artifacts(parent.info.run_id)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        saved = json.loads(Path(client.download_artifacts(parent.info.run_id, RACE_ARTIFACT, tmp)).read_text())
    rules = saved["rules"]
    return RaceRules(**{**rules, "seeds": tuple(rules["seeds"])}), [(of, values) for of, values in saved["points"]]


def objectives_of(runs: list, metric: str) -> dict[str, dict[int, float]]:
    """{what it confirms: {seed: objective}} of the confirmation runs that ended: a finished run's objective, NaN
    for one that failed. Unfinished runs (running, or interrupted for `resume`) are not there yet."""
    found: dict[str, dict[int, float]] = {}
    for run in runs:
        if run.info.status not in ("FINISHED", "FAILED"):
            continue
        value = run.data.metrics.get(metric, math.nan) if run.info.status == "FINISHED" else math.nan
        found.setdefault(run.data.tags.get(TAG_CONFIRMS, ""), {})[int(run.data.tags.get(TAG_SEED, -1))] = value
    return found


def race_of(client, parent, runs: list, metric: str, mode: str, lost: Collection[tuple[str, int]] = ()) -> Race:
    """The race replayed from its confirmation `runs`; a search confirmed before racing is read as a race of one
    look over the seeds it trained. `lost`: (configuration, seed) of runs a Tuner tried that left no record,
    counted as failed."""
    objectives = objectives_of(runs, metric)
    for of, seed in lost:
        objectives.setdefault(of, {}).setdefault(seed, math.nan)
    saved = read_race(client, parent)
    if saved is not None:
        rules, points = saved
        return replay(rules, [of for of, _ in points if of != DEFAULT], objectives)
    names = [of for of in objectives if of != DEFAULT]
    seeds = tuple(sorted({s for by_seed in objectives.values() for s in by_seed}))
    rules = RaceRules(len(names), seeds, racing=False, default=DEFAULT in objectives, mode=mode)
    return replay(rules, names, objectives) if seeds else Race(rules, names)


def reusable(client, identities: list[str], parent_id: str, metric: str) -> dict[str, Any]:
    """{identity: a FINISHED confirmation run with it and a finite objective, outside this search}, across every
    experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, Any] = {}
    for identity in identities:
        runs = client.search_runs(experiments, max_results=20,
                                  filter_string=f"tags.`{TAG_IDENTITY}` = '{identity}' and attributes.status = 'FINISHED'")
        for run in runs:
            if run.data.tags.get("mlflow.parentRunId") != parent_id and math.isfinite(run.data.metrics.get(metric, math.nan)):
                found[identity] = run
                break
    return found


def record_reused(client, experiment_id: str, parent_id: str, config: dict[str, Any], source) -> str:
    """A child run of this search standing for the reused run `source`: linked to the run that trained it, with
    its params and latest metrics. `config`: the confirmation's {of, values, seed, round, identity}."""
    origin = source.data.tags.get(TAG_REUSED_FROM, source.info.run_id)
    run = client.create_run(experiment_id, run_name=f"confirm-{config['of'][:8]}-seed{config['seed']}-reused", tags={
        "mlflow.parentRunId": parent_id, TAG_KIND: KIND_CONFIRMATION, TAG_CONFIRMS: config["of"],
        TAG_SEED: str(config["seed"]), TAG_ROUND: str(config["round"]), TAG_IDENTITY: config["identity"],
        TAG_REUSED_FROM: origin})
    log_params(client, run.info.run_id, source.data.params)
    step = int(source.data.metrics.get("epoch", 0))
    log_metrics(client, run.info.run_id, dict(source.data.metrics), step=step)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
