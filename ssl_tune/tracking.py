"""MLflow tracking of a search: one parent run, one nested child run per trial.

Only the Tune driver writes to MLflow (a callback), so a local sqlite store is safe. Metrics
go in one `log_batch` call per epoch; Tune's bookkeeping keys are never logged.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from ssl_tune.spec import SpecBase

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Keys Tune or Ray Train add to a result, and ours that are not metrics.
NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_id", "experiment_tag", "checkpoint_path",
                                       "should_checkpoint", "iterations_since_restore", "time_since_restore"}
# Tags (namespaced so they never clash with MLflow's own).
TAG_KIND = "ssl_tune.kind"  # "search" on parents, "trial" on children
TAG_TRIAL_ID = "ssl_tune.trial_id"
TAG_BEST_CHECKPOINT = "ssl_tune.best_checkpoint"
TAG_BEST_EPOCH = "ssl_tune.best_checkpoint_epoch"
TAG_STOPPED_AT = "ssl_tune.stopped_at_epoch"
TAG_BEST_TRIAL_RUN = "ssl_tune.best_trial_run_id"
TAG_METRIC = "ssl_tune.metric"
TAG_MODE = "ssl_tune.mode"
TAG_SEARCHED = "ssl_tune.searched_params"
TAG_ERROR = "ssl_tune.error"


def resolve_uri(uri: str | None = None) -> str:
    """The given URI, else MLFLOW_TRACKING_URI, else ./mlflow.db; sqlite paths made absolute (Ray workers chdir)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def tracking_uri(spec: SpecBase) -> str:
    return resolve_uri(spec.mlflow.tracking_uri)


def client_for(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    entries = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for chunk in _chunks(entries, 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=chunk)


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's metrics in a Tune result: numbers that are not Tune's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow child run per trial, metrics per epoch, final status.

    A trial that the scheduler stopped before its last epoch ends KILLED with the epoch it
    reached; one that raised (e.g. diverged) ends FAILED with the reason.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, spec: SpecBase) -> None:
        self.uri, self.experiment, self.parent_run_id, self.spec = uri, experiment, parent_run_id, spec
        self.metric, self.mode = spec.search.metric, spec.search.mode
        self.runs: dict[str, str] = {}  # trial id -> child run id
        self.best: dict[str, float] = {}  # trial id -> objective of its best checkpoint so far
        self.last_epoch: dict[str, int] = {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.runs:
            return
        from ssl_tune.search import field_values

        run = self.client.create_run(
            self.experiment,
            run_name=f"trial-{trial.trial_id}",
            tags={"mlflow.parentRunId": self.parent_run_id, TAG_KIND: "trial", TAG_TRIAL_ID: trial.trial_id},
        )
        self.runs[trial.trial_id] = run.info.run_id
        # The resolved spec, flattened: the sampled values sit at their field paths.
        log_params(self.client, run.info.run_id, self.spec.resolve(field_values(trial.config)).flat())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        metrics = result_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        self.last_epoch[trial.trial_id] = epoch
        log_metrics(self.client, run_id, metrics, step=epoch)
        # Multi-worker trials (Ray Train) report their checkpoint's path with the result.
        if "checkpoint_path" in result:
            self._checkpoint(trial.trial_id, result["checkpoint_path"], metrics.get(self.metric), epoch)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        # Single-worker trials report through Tune: the checkpoint belongs to the last result.
        last = trial.last_result or {}
        self._checkpoint(trial.trial_id, checkpoint.path, last.get(self.metric), int(last.get("epoch", 0)))

    def _checkpoint(self, trial_id: str, path: str, value: float | None, epoch: int) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None or value is None:
            return
        previous = self.best.get(trial_id)
        # Ties go to the later checkpoint, as Ray's checkpoint managers keep it.
        if previous is None or (value >= previous if self.mode == "max" else value <= previous):
            self.best[trial_id] = value
            self.client.set_tag(run_id, TAG_BEST_CHECKPOINT, path)
            self.client.set_tag(run_id, TAG_BEST_EPOCH, str(epoch))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        reached = self.last_epoch.get(trial.trial_id, 0)
        if reached < self.spec.training.epochs:
            self.client.set_tag(run_id, TAG_STOPPED_AT, str(reached))
            self.client.set_terminated(run_id, "KILLED")
        else:
            self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, TAG_ERROR, _error_summary(trial))
        self.client.set_terminated(run_id, "FAILED")


def _error_summary(trial) -> str:
    """The last line of the trial's error (its exception), for the run's tag."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:5000]


# --- reading a search back ---------------------------------------------------------------


def find_parent_run(client, experiment_or_run: str):
    """A search's parent run from its run id, a trial's run id, or an experiment name (latest search)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(experiment_or_run)
    except MlflowException:
        run = None
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        return client.get_run(parent) if parent else run
    experiment = client.get_experiment_by_name(experiment_or_run)
    if experiment is None:
        raise LookupError(f"no MLflow experiment or run named {experiment_or_run!r}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LookupError(f"experiment {experiment_or_run!r} has no ssl-tune search")
    return runs[0]


def child_runs(client, parent) -> list:
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                              max_results=10000)


def leaderboard(client, parent) -> list[dict[str, Any]]:
    """One row per trial, best objective first: rank, params, objective, status, epochs, duration."""
    metric = parent.data.tags.get(TAG_METRIC, "knn_top1")
    mode = parent.data.tags.get(TAG_MODE, "max")
    searched = [p for p in parent.data.tags.get(TAG_SEARCHED, "").split(",") if p]
    rows = []
    for run in child_runs(client, parent):
        m = run.data.metrics
        end = run.info.end_time or int(time.time() * 1000)
        rows.append({
            "trial_id": run.data.tags.get(TAG_TRIAL_ID, ""),
            "run_id": run.info.run_id,
            **{p: _param_value(run.data.params.get(p)) for p in searched},
            "objective": m.get(metric, math.nan),
            "status": run.info.status,
            "epochs": int(m.get("epoch", 0)),
            "duration_s": round((end - run.info.start_time) / 1000, 1),
        })
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r["objective"]), sign * (0 if math.isnan(r["objective"]) else r["objective"])))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return [{"rank": r.pop("rank"), **r} for r in rows]


def _param_value(text: str | None) -> Any:
    """MLflow stores params as text; give numbers back as numbers."""
    if text is None:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no trials)"
    columns = columns or [c for c in rows[0] if c not in ("run_id",)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
