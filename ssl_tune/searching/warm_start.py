"""`search.warm_start`: start a search from what earlier searches in the tracking store measured.

An earlier search of the **same setting** gives its finished trials (finished, or stopped by ASHA, as
the earlier search's sampler saw them) to this search's sampler as completed Optuna trials, before the
first new trial and without retraining: TPE, GP or CMA-ES start informed, and their random start-up
(`search.startup_trials`) counts these trials. An earlier search of **another setting** (another
data subset, epoch count, backbone, ...) measured something else, so it gives only its best
configuration, by the one definition of best (the confirmed winner, else the best trial), which is
tried first, after `search.points_to_evaluate`.

The same setting means: the objective (`search.metric`, `search.mode`) and every field this spec
fixes, the method's, the data's, the backbone's, the projector's, the optimizer's, training's and
evaluation's, hold the same values in both specs, except the fields in `NOT_SETTING`, which change
where or how a trial runs but not what it measures. Fields this spec searches may have been searched
or fixed there; an earlier trial counts when its values lie in this spec's ranges.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_tune.searching.space import ORIGIN_POINTS, distribution, optuna_name, param_value
from ssl_tune.spec import Choice, IntRange, SpecBase, SpecError

# Fields (a prefix ending in "." names a section) that do not change what a trial measures.
NOT_SETTING = ("name", "storage_path", "search.", "resources.", "mlflow.", "data.cache_dir", "data.on_device",
               "training.checkpoint_every", "evaluation.batch_size", "evaluation.linear_probe",
               "evaluation.label_fractions")
SETTING_IN_SEARCH = ("search.metric", "search.mode")  # the objective is part of the setting


def setting(spec: SpecBase) -> dict[str, Any]:
    """The fixed fields that decide what a trial of `spec` measures, by dotted path."""
    searched = set(spec.searchable_paths())
    return {path: value for path, value in spec.flat().items()
            if path not in searched and (path in SETTING_IN_SEARCH or not any(
                path == p or (p.endswith(".") and path.startswith(p)) for p in NOT_SETTING))}


def setting_differences(spec: SpecBase, earlier: SpecBase) -> list[str]:
    """The setting's fields whose values differ in `earlier`, as `path: here vs there`."""
    there = earlier.flat()
    return [f"{path} {value!r} here, {there.get(path)!r} there" for path, value in setting(spec).items()
            if there.get(path) != value]


def _inside(r, value: Any) -> bool:
    if isinstance(r, Choice):
        return any(str(c) == str(value) for c in r.values)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return False
    if isinstance(r, IntRange):
        return r.low <= value <= r.high and (value - r.low) % r.step == 0
    return r.low <= value <= r.high


def values_in_space(spec: SpecBase, params: dict[str, str]) -> dict[str, Any] | None:
    """An earlier run's searched values (its params as MLflow text) for this spec's ranges and their taken
    branches, or None when one is missing or lies outside this spec's range."""
    values: dict[str, Any] = {}
    ranges = spec.search_ranges()
    for path, r in ranges.items():
        values[path] = param_value(params.get(path), r)
    for (path, branch_value), branch in spec.branch_ranges().items():
        if str(values[path]) == branch_value:
            values.update({sub: param_value(params.get(sub), r) for sub, r in branch.items()})
    if any(v is None for v in values.values()):
        return None
    all_ranges = {**ranges, **{sub: r for (_, _), branch in spec.branch_ranges().items() for sub, r in branch.items()}}
    return values if all(_inside(all_ranges[p], v) for p, v in values.items()) else None


@dataclass(frozen=True)
class Observation:
    """An earlier trial, told to the sampler as a completed trial."""

    values: dict[str, Any]  # field path -> value
    objective: float
    run_id: str  # the earlier trial's run

    def frozen_trial(self, spec: SpecBase):
        """The completed Optuna trial, under the Optuna names `ssl_tune.searching.space.SearchSpace` samples."""
        import optuna

        ranges = spec.search_ranges()
        params, distributions = {}, {}
        for path, r in ranges.items():
            params[path], distributions[path] = self.values[path], distribution(r)
        for (path, branch_value), branch in spec.branch_ranges().items():
            if str(self.values[path]) == branch_value:
                for sub, r in branch.items():
                    name = optuna_name(sub, branch_value)  # (the same text as the sampled value's)
                    params[name], distributions[name] = self.values[sub], distribution(r)
        return optuna.trial.create_trial(params=params, distributions=distributions, value=self.objective,
                                         user_attrs={"ssl_tune.warm_start_run": self.run_id})


@dataclass
class WarmStart:
    observations: list[Observation] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)  # configurations to try first, by field path
    origins: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (point, where it came from)
    lines: list[str] = field(default_factory=list)  # one per earlier search, for the console and the parent run


def gather(spec: SpecBase, client, uri: str) -> WarmStart:
    """Read `search.warm_start`'s searches from the store. A name or id that is no search there
    raises SpecError naming the store (exit 2), before any trial."""
    from ssl_tune import tracking

    warm = WarmStart(origins=[(dict(p), ORIGIN_POINTS) for p in spec.search.points_to_evaluate])
    for ref in spec.search.warm_start:
        try:
            parent = tracking.find_parent_run(client, ref)
            metric, mode = tracking.objective_of(parent)
        except LookupError as exc:
            raise SpecError(f"search.warm_start: {exc} in the tracking store {uri}") from None
        name = parent.info.run_name
        earlier = _spec_of(client, parent)
        differs = ["its spec no longer loads"] if earlier is None else setting_differences(spec, earlier)
        if not differs:
            found = _observations(spec, client, parent, metric)
            warm.observations += found
            warm.lines.append(f"{name} ({parent.info.run_id}): same setting, {len(found)} finished trials told "
                              "to the sampler")
            continue
        best_run = tracking.best_trial_run_id(client, parent)
        values = values_in_space(spec, client.get_run(best_run).data.params) if best_run else None
        if values is None:
            warm.lines.append(f"{name} ({parent.info.run_id}): another setting ({differs[0]}), and no best "
                              "configuration inside this spec's ranges")
            continue
        warm.points.append(values)
        warm.origins.append((values, f"warm_start:{name}"))
        warm.lines.append(f"{name} ({parent.info.run_id}): another setting ({'; '.join(differs[:2])}"
                          f"{'; ...' if len(differs) > 2 else ''}), its best configuration tried first")
    return warm


def _spec_of(client, parent) -> SpecBase | None:
    import yaml

    from trainers import spec_model

    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(parent.info.run_id, "spec.yaml", tmp)).read_text()
        return spec_model().model_validate(yaml.safe_load(text))
    except Exception:  # an older schema, or a missing artifact: it counts as another setting
        return None


def _observations(spec: SpecBase, client, parent, metric: str) -> list[Observation]:
    from ssl_tune import tracking

    found = []
    for run in tracking.child_runs(client, parent, tracking.KIND_TRIAL):
        value = run.data.metrics.get(metric)
        if tracking.trial_status(run) not in (tracking.FINISHED, tracking.STOPPED) or value is None or math.isnan(value):
            continue
        values = values_in_space(spec, run.data.params)
        if values is not None:
            found.append(Observation(values, float(value), run.info.run_id))
    return found
