"""The search space and the objective: what a spec's ranges mean to Optuna, and which trial is best.

One home for each meaning the search, tracking, console and figures share:

* a range -> an Optuna distribution (`distribution`), and sampling one (`suggest`);
* Optuna parameter names <-> spec field paths: a conditional branch's sub-range is named
  ``field.path|value`` so that each branch has its own distribution (`optuna_name`, `field_path`);
* MLflow's parameter text -> a value (`param_value`);
* "better" under the objective's mode, how it reads (`direction`), and the one rule for the best
  trial (`better`, `ranked`, `best_trial`);
* an in-memory Optuna study rebuilt from finished trials (`study_from_trials`), for figures and
  parameter importance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ssl_tune.spec import Choice, IntRange, LogUniform, SpecBase, Uniform, range_default

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # (pydantic's dependency; Python 3.13 has it in typing)

# Optuna names a branch's sub-range "field.path|value", so each branch has its own distribution.
BRANCH_SEPARATOR = "|"


def distribution(r: Uniform | LogUniform | IntRange | Choice):
    """The Optuna distribution of a spec range."""
    import optuna.distributions as d

    if isinstance(r, Uniform):
        return d.FloatDistribution(r.low, r.high)
    if isinstance(r, LogUniform):
        return d.FloatDistribution(r.low, r.high, log=True)
    if isinstance(r, IntRange):
        return d.IntDistribution(r.low, r.high, log=r.log, step=r.step)
    if isinstance(r, Choice):
        return d.CategoricalDistribution(r.values)
    raise TypeError(f"not a search range: {r!r}")


def suggest(trial, name: str, r: Uniform | LogUniform | IntRange | Choice) -> Any:
    """Sample `r` in an Optuna define-by-run trial under `name`."""
    import optuna.distributions as d

    dist = distribution(r)
    if isinstance(dist, d.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


class SearchSpace:
    """Optuna define-by-run space over a spec's ranges; a choice's branch is sampled only when taken.

    A class rather than a closure so that Tune can pickle the searcher with it.
    """

    def __init__(self, spec: SpecBase) -> None:
        self.ranges = spec.search_ranges()

    def __call__(self, trial) -> None:
        for path, r in self.ranges.items():
            value = suggest(trial, path, r)
            if isinstance(r, Choice):
                for sub_path, sub in r.branches.get(str(value), {}).items():
                    suggest(trial, optuna_name(sub_path, value), sub)


def optuna_name(path: str, branch_value: Any = None) -> str:
    """The Optuna parameter name of a field path (of a branch's sub-range when `branch_value` is given)."""
    return path if branch_value is None else f"{path}{BRANCH_SEPARATOR}{branch_value}"


def field_path(name: str) -> str:
    """An Optuna parameter name -> the spec field path it sets."""
    return name.split(BRANCH_SEPARATOR)[0]


# A confirmation trial's config is {CONFIRMATION_KEY: {"values": field values, "seed": training seed,
# "of": the search trial's run id, or "default", "round": the race's round, "identity": what reuse matches
# (`ssl_tune.tracking.race_record.run_identity`)}}: one grid value, so Tune needs no searcher for it.
CONFIRMATION_KEY = "confirmation"
# Every trial's config also holds {SEARCH_RUN_KEY: its search's MLflow parent run id}, so that Tune's own
# files (`params.json`, `result.json`, the experiment state) say which search a trial belongs to: `resume`
# and its replay into MLflow refuse another search's trials (`ssl_tune.searching.replay.check_owned`).
SEARCH_RUN_KEY = "ssl_tune_search"


def field_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config -> field paths, as `SpecBase.resolve` takes them: a search trial's Optuna
    names, or a confirmation trial's values (`CONFIRMATION_KEY`)."""
    if CONFIRMATION_KEY in config:
        return dict(config[CONFIRMATION_KEY]["values"])
    return {field_path(name): value for name, value in config.items() if name != SEARCH_RUN_KEY}


# Where a search trial's configuration came from (its run's `ssl_tune.origin` tag): the sampler, a point of
# `search.points_to_evaluate`, or "warm_start:SEARCH", an earlier search's best (`ssl_tune.searching.warm_start`).
ORIGIN_SAMPLER, ORIGIN_POINTS = "sampler", "points_to_evaluate"


def origin(values: dict[str, Any], origins: list[tuple[dict[str, Any], str]]) -> str:
    """Where a new trial's configuration came from: a point it repeats (`search.points_to_evaluate`, or an
    earlier search's best), else the sampler."""
    for point, label in origins:
        if point and all(k in values and str(values[k]) == str(v) for k, v in point.items()):
            return label
    return ORIGIN_SAMPLER


def resolve_trial(spec: SpecBase, config: dict[str, Any]) -> SpecBase:
    """The resolved spec a trial trains: the sampled values, and a confirmation's own training seed."""
    resolved = spec.resolve(field_values(config))
    if CONFIRMATION_KEY in config:
        resolved.training.seed = int(config[CONFIRMATION_KEY]["seed"])
    return resolved


def optuna_names(spec: SpecBase, values: dict[str, Any]) -> dict[str, Any]:
    """Field paths -> Optuna parameter names (for warm-start points)."""
    branch_of = {}
    for (path, value), branch in spec.branch_ranges().items():
        chosen = values.get(path, range_default(spec.search_ranges()[path]))
        if str(chosen) == value:
            branch_of.update({sub_path: value for sub_path in branch})
    return {optuna_name(k, branch_of.get(k)): v for k, v in values.items()}


def param_value(text: str | None, r: Uniform | LogUniform | IntRange | Choice | None = None) -> Any:
    """A parameter as MLflow stores it (text) -> its value: by the range's type when known, else a
    number when the text reads as one."""
    if text is None:
        return None
    if isinstance(r, Choice):
        return next((c for c in r.values if str(c) == text), text)
    if isinstance(r, IntRange):
        return int(float(text))
    if isinstance(r, (Uniform, LogUniform)):
        return float(text)
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


# --- the objective ------------------------------------------------------------------------------
#
# One definition, used by the console, the leaderboard, the parent run, Optuna and export: a trial's
# objective is `search.metric` at its LAST evaluated epoch, and its checkpoint is that epoch's.
# Not the best epoch: picking the best of a trial's per-epoch evaluations on the same test images
# selects on their noise (about 0.9 points of binomial error for 2,000 images) and reports an
# optimistic number that no checkpoint reproduces on fresh data. The last epoch is also what Optuna
# and ASHA receive from Tune, what a researcher would train to, and what `ssl-tune train` reports.


def counts(value: float | None) -> TypeIs[float]:
    """Whether an objective value can be compared (a number, not NaN)."""
    return value is not None and not math.isnan(value)


def better(value: float | None, than: float | None, mode: str) -> bool:
    """Whether `value` is strictly better than `than` under `mode` ("max" or "min"); a value that
    does not count (None, NaN) is never better, and any value that counts beats one that does not."""
    if not counts(value):
        return False
    if not counts(than):
        return True
    return value > than if mode == "max" else value < than


def direction(metric: str, mode: str) -> str:
    """The objective as people read it: the metric and which way is better."""
    return f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)"


def best_value(values: Iterable[float | None], mode: str) -> float | None:
    """The best of `values` that count, None if none does."""
    best = None
    for value in values:
        if better(value, best, mode):
            best = value
    return best


def ranked(rows: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Trial rows (with "objective") best first; rows whose objective does not count go last."""
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (not counts(r["objective"]), sign * r["objective"] if counts(r["objective"]) else 0))


def best_trial(rows: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The one rule for a search's best trial: the best objective among trials that did not fail
    (a FAILED trial's last value is not a result), None if there is none."""
    return next((r for r in ranked(rows, mode) if counts(r["objective"]) and r.get("status") != "failed"), None)


def study_from_trials(spec: SpecBase, trials: Iterable[tuple[dict[str, str], float]], mode: str):
    """An in-memory Optuna study with one completed trial per (params as MLflow text, objective)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranges = spec.search_ranges()
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for params_text, value in trials:
        present = {path: r for path, r in ranges.items() if path in params_text}
        study.add_trial(optuna.trial.create_trial(
            params={path: param_value(params_text[path], r) for path, r in present.items()},
            distributions={path: distribution(r) for path, r in present.items()}, value=value))
    return study
