"""Reading a search back: its parent run by name or id, its trials, leaderboard and confirmation table."""

from __future__ import annotations

import collections
import math
import time
from typing import Any

from ssl_tune.searching import confirmation as confirmation_stage
from ssl_tune.searching.space import best_trial, param_value, ranked
from ssl_tune.tracking.race_record import objectives_of, race_of
from ssl_tune.tracking.tags import (ENDED, KIND_CONFIRMATION, KIND_TRIAL, TAG_BEST_TRIAL_RUN, TAG_CONFIRMS, TAG_KIND,
                                    TAG_METHOD, TAG_METRIC, TAG_MODE, TAG_SEARCHED, TAG_TRIAL_ID,
                                    trial_status)


def objective_of(parent) -> tuple[str, str]:
    """A search's objective, (metric, mode), as its parent run records it (`record.open_search_run`)."""
    try:
        return parent.data.tags[TAG_METRIC], parent.data.tags[TAG_MODE]
    except KeyError:
        raise LookupError(f"run {parent.info.run_id} is not an ssl-tune search: it has no {TAG_METRIC} and "
                          f"{TAG_MODE} tags") from None


def searches_named(client, name: str) -> list:
    """Every search (parent run) called `name` (`ssl-tune run --name`), in any experiment, newest first."""
    if '"' in name and "'" in name:  # no MLflow filter string can quote it: no search can be found by it
        return []
    quote = "'" if "'" not in name else '"'
    all_experiments = [e.experiment_id for e in client.search_experiments(max_results=50000)]
    if not all_experiments:
        return []
    return client.search_runs(
        all_experiments, filter_string=f"tags.`{TAG_KIND}` = 'search' and attributes.run_name = {quote}{name}{quote}",
        order_by=["attributes.start_time DESC"], max_results=100)


def find_parent_run(client, experiment_or_run: str, *, unfinished: bool = False):
    """A search's parent run from its run id, a trial's run id, the search's name (`ssl-tune run
    --name`) or an experiment name (its latest search; with `unfinished`, its one unfinished search).

    Raises LookupError naming the candidates when a name fits more than one search. With `unfinished`,
    a name shared by several searches of which exactly one is unfinished (a search stopped, then `run`
    again under the same name) means that one.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(experiment_or_run)
    except MlflowException:
        run = None
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        return client.get_run(parent) if parent else run
    named = searches_named(client, experiment_or_run)
    if len(named) > 1 and unfinished:
        open_named = [r for r in named if r.info.status not in ENDED]
        named = open_named or named
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        which = "unfinished searches" if unfinished and named[0].info.status not in ENDED else "searches"
        raise LookupError(f"{len(named)} {which} are named {experiment_or_run!r}; give one run id:\n"
                          + _candidates(client, named))
    is_search = f"tags.`{TAG_KIND}` = 'search'"
    experiment = client.get_experiment_by_name(experiment_or_run)
    if experiment is None:
        raise LookupError(f"no MLflow experiment, search name or run id {experiment_or_run!r}")
    runs = client.search_runs([experiment.experiment_id], filter_string=is_search,
                              order_by=["attributes.start_time DESC"], max_results=1000)
    if not runs:
        raise LookupError(f"experiment {experiment_or_run!r} has no ssl-tune search")
    if not unfinished:
        return runs[0]
    open_runs = [r for r in runs if r.info.status not in ENDED]
    if len(open_runs) == 1:
        return open_runs[0]
    if not open_runs:
        raise LookupError(f"experiment {experiment_or_run!r} has no unfinished search; its latest is "
                          f"{runs[0].info.run_name!r} ({runs[0].info.run_id}), {runs[0].info.status}")
    raise LookupError(f"experiment {experiment_or_run!r} has {len(open_runs)} unfinished searches; give the name or "
                      "run id of one:\n" + _candidates(client, open_runs))


def search_reference(client, parent_run_id: str) -> str:
    """What to call a search in the commands printed for the user: its name while no other search shares
    it, else its parent run id (which never becomes ambiguous)."""
    name = client.get_run(parent_run_id).info.run_name
    return name if [r.info.run_id for r in searches_named(client, name)] == [parent_run_id] else parent_run_id


def _candidates(client, runs: list) -> str:
    """One line per search: name, run id, experiment, status, start time."""
    lines = []
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
        experiment = client.get_experiment(run.info.experiment_id).name
        lines.append(f"  {run.info.run_name}  {run.info.run_id}  experiment {experiment!r}  {run.info.status}  "
                     f"started {started}")
    return "\n".join(lines)


def child_runs(client, parent, kind: str | None = KIND_TRIAL) -> list:
    """A search's child runs of one kind (`KIND_TRIAL`, `KIND_CONFIRMATION`), or all with None."""
    of_kind = f" and tags.`{TAG_KIND}` = '{kind}'" if kind else ""
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'{of_kind}",
                              max_results=10000)


def list_searches(client) -> list[dict[str, Any]]:
    """One row per search in the store, newest first: name, experiment, start, method, trials, best
    objective (by `space.best_trial`), the confirmed winner's mean (NaN without a confirmation stage),
    the objective's name and the parent run's status."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments(max_results=50000)}
    if not experiments:
        return []
    searches = client.search_runs(list(experiments), filter_string=f"tags.`{TAG_KIND}` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1000)
    trials: dict[str, list] = collections.defaultdict(list)
    for run in client.search_runs(list(experiments), filter_string=f"tags.`{TAG_KIND}` = 'trial'", max_results=50000):
        trials[run.data.tags.get("mlflow.parentRunId", "")].append(run)
    rows = []
    for search in searches:
        metric, mode = objective_of(search)
        children = trials[search.info.run_id]
        best = best_trial([{"objective": c.data.metrics.get(metric, math.nan), "status": trial_status(c)} for c in children],
                          mode)
        rows.append({"search": search.info.run_name, "experiment": experiments[search.info.experiment_id],
                     "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(search.info.start_time / 1000)),
                     "method": search.data.tags.get(TAG_METHOD, "-"), "trials": len(children),
                     "best": best["objective"] if best else math.nan,
                     "confirmed": search.data.metrics.get("confirmed_mean", math.nan), "metric": f"{metric} ({mode})",
                     "status": search.info.status, "run_id": search.info.run_id})
    return rows


def best_trial_run_id(client, parent) -> str | None:
    """The best trial's run id of a search: as recorded when it finished, else (running or
    interrupted) by `space.best_trial` over its trials so far."""
    recorded = parent.data.tags.get(TAG_BEST_TRIAL_RUN)
    if recorded:
        return recorded
    best = best_trial(leaderboard(client, parent), objective_of(parent)[1])
    return best["run_id"] if best else None


def leaderboard(client, parent) -> list[dict[str, Any]]:
    """One row per trial, best objective first: rank, params, objective, status, epochs, duration."""
    metric, mode = objective_of(parent)
    searched = [p for p in parent.data.tags.get(TAG_SEARCHED, "").split(",") if p]
    rows = []
    for run in child_runs(client, parent):
        m = run.data.metrics
        end = run.info.end_time or int(time.time() * 1000)
        rows.append({
            "trial_id": run.data.tags.get(TAG_TRIAL_ID, ""),
            "run_id": run.info.run_id,
            **{p: param_value(run.data.params.get(p)) for p in searched},
            "objective": m.get(metric, math.nan),
            "status": trial_status(run),
            "epochs": int(m.get("epoch", 0)),
            "duration_s": round((end - run.info.start_time) / 1000, 1),
        })
    rows = ranked(rows, mode)
    return [{"rank": rank, **row} for rank, row in enumerate(rows, 1)]


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no trials)"
    columns = columns or [c for c in rows[0] if c not in ("run_id",)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)  # None: a field the trial's method does not have

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def best_per_method(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """A search across methods: each method's best trial (`space.best_trial`), best first."""
    methods = dict.fromkeys(r["method.name"] for r in rows if "method.name" in r)
    best = [best_trial([r for r in rows if r["method.name"] == m], mode) for m in methods]
    return ranked([b for b in best if b is not None], mode)


def confirmation_table(client, parent, trials: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per confirmed configuration, best mean first (`confirmation.summarise`): what it
    confirms (a search trial's run id, or "default"), its searched values, seeds, mean, SD, 95%
    interval, the gain over the default with its interval at the race's level, the round it left the race,
    and `run_id`, its best seed's run (what export takes for the winner). `trials`: the search's leaderboard,
    if the caller has it."""
    metric, mode = objective_of(parent)
    searched = [p for p in parent.data.tags.get(TAG_SEARCHED, "").split(",") if p]
    confirmations = child_runs(client, parent, KIND_CONFIRMATION)
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in confirmations:
        # Only a run trained to the end is a confirmation; a failed one's last value is not a result.
        value = run.data.metrics.get(metric, math.nan) if run.info.status == "FINISHED" else math.nan
        runs[run.data.tags.get(TAG_CONFIRMS, "")].append({"objective": value, "status": trial_status(run),
                                                          "run_id": run.info.run_id, "params": run.data.params})
    rows = confirmation_stage.summarise(objectives_of(confirmations, metric), race_of(client, parent, confirmations,
                                                                                      metric, mode))
    trials = trials if trials is not None else leaderboard(client, parent)
    by_run = {r["run_id"]: r for r in trials}
    for row in rows:
        of = row["confirms"]
        rank = by_run[of]["rank"] if of in by_run else "?"
        row["configuration"] = of if of == confirmation_stage.DEFAULT else f"search #{rank}"
        best = best_trial(runs[row["confirms"]], mode)
        params = runs[row["confirms"]][0]["params"]
        row.update({p: param_value(params.get(p)) for p in searched})
        row["run_id"] = best["run_id"] if best else None
        # Its single run in the search (the default has one only when a search trial trained its values).
        searched_as = by_run.get(of) or next((t for t in trials if searched and all(t.get(p) == row[p] for p in searched)), None)
        row["search_objective"] = searched_as["objective"] if searched_as else math.nan
    return rows


def confirmation_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The confirmation table's printed columns (run ids left out)."""
    keys = dict.fromkeys(k for row in rows for k in row)  # the default's row has no gain columns
    return ["configuration"] + [c for c in keys if c not in ("run_id", "objective", "confirms", "configuration")]
