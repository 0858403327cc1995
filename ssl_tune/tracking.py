"""MLflow tracking of a search: one parent run, one nested child run per trial.

The Tune driver writes the runs, their parameters, metrics and tags (a callback); metrics go in one
`log_batch` call per epoch, and Tune's bookkeeping keys are never logged. Each trial adds its own
system metrics and exports to its run from its own process (`ssl_tune.trial_record`): a few small
writes a minute, which a local sqlite store takes beside the driver's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from ssl_tune import figures
from ssl_tune.evaluation import EVALUATION_FILE, load_arrays
from ssl_tune import confirmation as confirmation_stage
from ssl_tune.space import (CONFIRMATION_KEY, best_trial, counts, param_value, ranked, resolve_trial,
                            study_from_trials)
from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.trial_record import TAG_CHECKPOINT_ARTIFACT, TAG_TRIAL_ID
from ssl_tune.trial import (DAMAGED_CHECKPOINT_KEY, FAILURE_KEY, RESTORED_FROM_KEY, RESTORED_HISTORY_KEY,
                            STORAGE_FULL_KEY, error_summary, error_text, last_line)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Keys Tune or Ray Train add to a result, and ours that are not metrics.
NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_id", "experiment_tag", "checkpoint_path",
                                       "should_checkpoint", "iterations_since_restore", "time_since_restore"}
# Tags (namespaced so they never clash with MLflow's own).
TAG_KIND = "ssl_tune.kind"  # "search" on parents; on children "trial", or "confirmation" (`ssl_tune.confirmation`)
KIND_TRIAL, KIND_CONFIRMATION = "trial", "confirmation"
TAG_CONFIRMS = "ssl_tune.confirms"  # on confirmations: the search trial's run id, or "default"
TAG_SEED = "ssl_tune.seed"  # on confirmations: the training seed
TAG_STAGE = "ssl_tune.stage"  # on parents: "confirmation" while its trials run, then "done"
TAG_CONFIRMATION_TRIALS = "ssl_tune.confirmation_trials"  # on parents: how many the stage runs
TAG_VERDICT = "ssl_tune.confirmation_verdict"  # on parents: whether the winner beats the default
TAG_BEATS_DEFAULT = "ssl_tune.beats_default"  # on parents: "true" / "false"
# On trials: the checkpoint the objective was measured on (its last evaluated epoch; `ssl_tune.space`).
TAG_CHECKPOINT = "ssl_tune.checkpoint"
TAG_CHECKPOINT_EPOCH = "ssl_tune.checkpoint_epoch"
TAG_STOPPED_AT = "ssl_tune.stopped_at_epoch"
TAG_BEST_TRIAL_RUN = "ssl_tune.best_trial_run_id"
TAG_METRIC = "ssl_tune.metric"
TAG_MODE = "ssl_tune.mode"
TAG_SEARCHED = "ssl_tune.searched_params"
TAG_ERROR = "ssl_tune.error"
TAG_DAMAGED_CHECKPOINT = "ssl_tune.damaged_checkpoint"  # on trials: a checkpoint skipped at a restore, and why
TAG_RESTARTS = "ssl_tune.restarts"
TAG_LAST_RESTART = "ssl_tune.last_restart_reason"
# Statuses of a search's parent run that `ssl-tune resume` cannot continue (KILLED means interrupted).
ENDED = ("FINISHED", "FAILED")
TAG_STORAGE = "ssl_tune.storage"  # on parents: the Tune experiment directory (what `ssl-tune resume` restores)
TAG_INTERRUPTED_AT = "ssl_tune.interrupted_at_epoch"
TAG_EPOCHS_LOST = "ssl_tune.epochs_lost"  # completed epochs trained again after restarts
TAG_METHOD = "ssl_tune.method"  # on parents: the method(s) searched, comma-separated; on children: the trial's
# How long the end of a search waits for held MLflow updates before giving up on them (seconds;
# $SSL_TUNE_TRACKING_WAIT_S changes it).
FINAL_FLUSH_S = 120.0


def final_flush_s() -> float:
    return float(os.environ.get("SSL_TUNE_TRACKING_WAIT_S") or FINAL_FLUSH_S)
# Updates this process gave up on at the end of a stage (the server stayed away): the stage's record is
# then incomplete, and `ssl-tune resume` completes it from Tune's files (`ssl_tune.replay`).
_given_up: list[int] = [0]


def updates_given_up(reset: bool = False) -> int:
    count = _given_up[0]
    if reset:
        _given_up[0] = 0
    return count


def resolve_uri(uri: str | None = None) -> str:
    """The given URI, else MLFLOW_TRACKING_URI, else ./mlflow.db; sqlite paths made absolute (Ray workers chdir)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def client_for(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def existing_store_client(uri: str):
    """A client for a tracking store that must already exist (read-only commands: results, list,
    export). MLflow would create an empty store for a missing sqlite file or local directory, and then
    report "no experiment"; this raises LookupError naming the store instead."""
    if uri.startswith("sqlite:///"):
        local = uri.removeprefix("sqlite:///")
    elif uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        local = uri.removeprefix("file://").removeprefix("file:")  # a local directory store
    else:
        local = None  # a server (http, databricks, ...): it answers for itself
    if local is not None and not Path(local).exists():
        raise LookupError(f"no MLflow tracking store at {uri} ({local} does not exist); run this where the search "
                          "ran, or name the store with --tracking-uri or MLFLOW_TRACKING_URI")
    return client_for(uri)


def check_reachable(uri: str) -> None:
    """Raise `SpecError` if the tracking store cannot be reached (checked before any trial starts)."""
    if not uri.startswith(("http://", "https://")):
        return
    # One quick attempt instead of MLflow's default minutes of retries with back-off.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, HTTP errors: all mean "cannot log here"
        text = str(exc)
        if "error code 401" in text or "error code 403" in text:
            who = ("as " + os.environ["MLFLOW_TRACKING_USERNAME"]) if os.environ.get("MLFLOW_TRACKING_USERNAME") else \
                "without credentials"
            raise SpecError(f"mlflow.tracking_uri: the MLflow tracking server at {uri} refused this client {who} "
                            f"(HTTP {'401: not authenticated' if 'error code 401' in text else '403: no permission'}); "
                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to "
                            "an account of that server") from None
        raise SpecError(f"mlflow.tracking_uri: cannot reach the MLflow tracking server at {uri} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                        "start it (mlflow server --host ...) or point mlflow.tracking_uri / "
                        "MLFLOW_TRACKING_URI at a running one") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Each MLflow HTTP call of the driver gives up after about 20 s (MLflow's default is minutes of
# retries); `MlflowWriter` retries held updates itself. Values set in the environment win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def bound_http_retries() -> None:
    """Short timeouts and few retries for this process's MLflow HTTP calls, unless the user set them."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


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


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int, timestamp: int | None = None) -> None:
    from mlflow.entities import Metric

    now = timestamp if timestamp is not None else int(time.time() * 1000)
    entries = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for chunk in _chunks(entries, 1000):
        client.log_batch(run_id, metrics=chunk)


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's metrics in a Tune result: numbers that are not Tune's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowWriter:
    """Writes MLflow updates in order on a background thread, so that a slow or dead tracking
    server never blocks the Tune loop (and with it every trial).

    An update that fails is retried (every `retry_s`) until it succeeds; the updates after it wait,
    so the order is kept and nothing is written twice. The console says once when the server
    becomes unreachable and once when it is back. A best-effort update (figures) that fails while
    the server answers is dropped with a warning instead of holding the queue.
    """

    def __init__(self, uri: str, client_factory: Callable[[], Any], retry_s: float = 2.0) -> None:
        import threading

        self.uri, self.retry_s, self._client_factory = uri, retry_s, client_factory
        self._client = None
        self._queue: collections.deque[tuple[Callable[[], None], str | None]] = collections.deque()
        self._wake = threading.Condition()
        self._busy = False
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="ssl-tune-mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def submit(self, update: Callable[[], None], best_effort: str | None = None) -> None:
        """Queue `update` (never blocks). `best_effort` names it if it may be dropped on an error."""
        with self._wake:
            self._queue.append((update, best_effort))
            self._wake.notify()

    @property
    def pending(self) -> int:
        with self._wake:
            return len(self._queue) + self._busy

    def drain(self, timeout: float) -> bool:
        """Wait until every queued update is written; False if some are still held after `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.5))
        return True

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                update, best_effort = self._queue[0]
                self._busy = True
            error = None
            try:
                update()
            except Exception as exc:  # the store is down, or refuses the call
                error = exc
            # A best-effort update that fails while the server answers is its own fault: drop it.
            done = error is None or (best_effort is not None and self._reachable())
            with self._wake:
                self._busy = False
                if done:
                    self._queue.popleft()
                self._wake.notify_all()
            if error is None:
                self._back()
            elif done:
                print(f"warning: {best_effort} not logged ({type(error).__name__}: {error})", file=sys.__stderr__)
            else:
                self._down(error)
                time.sleep(self.retry_s)

    def _reachable(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _down(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            first = str(error).splitlines()[0][:200] if str(error) else ""
            print(f"warning: MLflow at {self.uri} is unreachable ({type(error).__name__}: {first}); training goes on, "
                  f"updates are held in order and retried every {self.retry_s:g} s, and Tune's result files keep every "
                  "metric", file=sys.__stderr__, flush=True)

    def _back(self) -> None:
        if self._down_since is not None:
            print(f"MLflow at {self.uri} is reachable again after {time.monotonic() - self._down_since:.0f} s; "
                  "held updates are being written", file=sys.__stderr__, flush=True)
            self._down_since = None


class MlflowTrialLogger(Callback):
    """Tune callback: a nested MLflow child run per trial, metrics per epoch, final status.

    A trial that the scheduler stopped before its last epoch ends KILLED with the epoch it
    reached; one that diverged, met bad data or raised ends FAILED with the reason as a tag (and,
    if it raised, the traceback as an artifact). A trial restarted after a worker or node died, or
    resumed by `ssl-tune resume`, continues its own run (found by its trial id), and epochs logged
    before are not logged twice.

    Every MLflow call runs on an `MlflowWriter` thread: the callback only queues updates, so a
    tracking outage never stalls training; Tune's own result files keep every metric whatever happens.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, spec: SpecBase) -> None:
        self.uri, self.experiment, self.parent_run_id, self.spec = uri, experiment, parent_run_id, spec
        self.metric = spec.search.metric
        self._reset()

    def _reset(self) -> None:
        self.runs: dict[str, str] = {}  # trial id -> child run id
        self.last_epoch: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.epochs_lost: dict[str, int] = {}
        self.failed: dict[str, str] = {}  # trial id -> reason (diverged, bad data)
        self.last_checkpoint: dict[str, str] = {}  # trial id -> directory of its latest checkpoint
        self.evaluated_checkpoint: dict[str, str] = {}  # trial id -> checkpoint of its last evaluated epoch
        self._writer: MlflowWriter | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into Tune's experiment state: a resumed search rebuilds the rest from MLflow.
        state = self.__dict__.copy()
        for key in ("runs", "last_epoch", "restarts", "epochs_lost", "failed", "last_checkpoint", "evaluated_checkpoint",
                    "_writer"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = MlflowWriter(self.uri, lambda: client_for(self.uri))
        return self._writer

    @property
    def client(self):
        return self.writer.client

    def _submit(self, update: Callable[[], None]) -> None:
        self.writer.submit(update)

    def on_experiment_end(self, trials, **info) -> None:
        if self.writer.drain(timeout=final_flush_s()):
            return
        _given_up[0] += self.writer.pending
        print(f"warning: {self.writer.pending} MLflow updates could not be written to {self.uri} within "
              f"{final_flush_s():g} s; the metrics are in Tune's result files under the search's storage directory",
              file=sys.__stderr__)

    # --- trials --------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = ""  # being created; the held update fills it in
            self._submit(lambda: self._open_run(trial))

    def _open_run(self, trial) -> None:
        # Find before create: a resumed search continues the trial's run, and a retried update (the
        # server went away after creating it) does not create a second one.
        existing = self.client.search_runs(
            [self.experiment], max_results=1,
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial.trial_id}'")
        if existing:
            run = existing[0]
            self.last_epoch[trial.trial_id] = int(run.data.metrics.get("epoch", 0))
            if TAG_CHECKPOINT in run.data.tags:
                self.evaluated_checkpoint[trial.trial_id] = run.data.tags[TAG_CHECKPOINT]
            self.epochs_lost[trial.trial_id] = int(run.data.tags.get(TAG_EPOCHS_LOST, 0))
            self.restarts[trial.trial_id] = int(run.data.tags.get(TAG_RESTARTS, 0))
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id, TAG_KIND: KIND_TRIAL, TAG_TRIAL_ID: trial.trial_id,
                    TAG_METHOD: resolve_trial(self.spec, trial.config).method.name}
            name = f"trial-{trial.trial_id}"
            confirmation = trial.config.get(CONFIRMATION_KEY)
            if confirmation is not None:
                tags.update({TAG_KIND: KIND_CONFIRMATION, TAG_CONFIRMS: confirmation["of"],
                             TAG_SEED: str(confirmation["seed"])})
                name = f"confirm-{confirmation['of'][:8]}-seed{confirmation['seed']}"
            run = self.client.create_run(self.experiment, run_name=name, tags=tags)
        if not run.data.params:
            # The resolved spec, flattened: the sampled values sit at their field paths.
            log_params(self.client, run.info.run_id, resolve_trial(self.spec, trial.config).flat())
        self.runs[trial.trial_id] = run.info.run_id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.trial_id not in self.runs:
            return
        if FAILURE_KEY in result:
            self.failed[trial.trial_id] = str(result[FAILURE_KEY])
            return
        if STORAGE_FULL_KEY in result:  # not an epoch: the search is being stopped (`search.StopWhenStorageFull`)
            return
        metrics = result_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        checkpoint_path = self._with_scheme(result.get("checkpoint_path"))
        timestamp = int(time.time() * 1000)  # fixed here: a retried write repeats the same rows, which MLflow ignores
        restored_from = result.get(RESTORED_FROM_KEY)
        restored_history = json.loads(result.get(RESTORED_HISTORY_KEY) or "[]")
        damaged = result.get(DAMAGED_CHECKPOINT_KEY)
        lost: list[int] = []  # computed once, even if the update is retried

        def update() -> None:
            if damaged:
                self.client.set_tag(self.runs[trial.trial_id], TAG_DAMAGED_CHECKPOINT, str(damaged)[:5000])
            if restored_from is not None:
                if not lost:
                    lost.append(max(0, self.last_epoch.get(trial.trial_id, 0) - int(restored_from)))
                    self.epochs_lost[trial.trial_id] = self.epochs_lost.get(trial.trial_id, 0) + lost[0]
                self.client.set_tag(self.runs[trial.trial_id], TAG_EPOCHS_LOST, str(self.epochs_lost[trial.trial_id]))
                # Epochs the checkpoint holds but whose results never arrived (the node died in between);
                # this result's own epoch is logged below, with its checkpoint.
                for past in restored_history:
                    past_epoch = int(past["epoch"])
                    if self.last_epoch.get(trial.trial_id, 0) < past_epoch <= min(int(restored_from), epoch - 1):
                        log_metrics(self.client, self.runs[trial.trial_id], past, step=past_epoch, timestamp=timestamp)
                        self.last_epoch[trial.trial_id] = past_epoch
            if epoch <= self.last_epoch.get(trial.trial_id, 0):
                return  # logged before a restart; the resumed run recomputed the same epoch
            log_metrics(self.client, self.runs[trial.trial_id], metrics, step=epoch, timestamp=timestamp)
            # Multi-worker trials (Ray Train) report their checkpoint's path with the result.
            if checkpoint_path:
                self.last_checkpoint[trial.trial_id] = checkpoint_path
                self._checkpoint(trial.trial_id, checkpoint_path, metrics.get(self.metric), epoch)
            self.last_epoch[trial.trial_id] = epoch  # after the writes: a failed one is retried in full

        self._submit(update)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        # Single-worker trials report through Tune: the checkpoint belongs to the last result.
        last = trial.last_result or {}
        self.checkpoint_reported(trial.trial_id, checkpoint.path, last.get(self.metric), int(last.get("epoch", 0)))

    def checkpoint_reported(self, trial_id: str, path: str, value: float | None, epoch: int) -> None:
        """A one-worker trial's checkpoint at `path` (as Tune names it), written with the result of `epoch`."""
        path = self._with_scheme(path)
        self.last_checkpoint[trial_id] = path
        self._submit(lambda: self._checkpoint(trial_id, path, value, epoch))

    def _with_scheme(self, path: str | None) -> str | None:
        """Ray names a checkpoint on object storage by its path inside the bucket; give it back its
        scheme (s3://, gs://) so the tag is a URI that export can open."""
        scheme, sep, _ = self.spec.storage_path.partition("://")
        # (Ray Train's results name a local staging copy on the driver: an absolute path, left as it is.)
        return f"{scheme}://{path}" if path and sep and "://" not in path and not path.startswith("/") else path

    def _checkpoint(self, trial_id: str, path: str, value: float | None, epoch: int) -> None:
        """Tag the checkpoint of each evaluated epoch: the last one is the trial's objective's."""
        run_id = self.runs.get(trial_id)
        if not run_id or value is None:
            return
        from mlflow.entities import RunTag

        self.evaluated_checkpoint[trial_id] = path
        self.client.log_batch(run_id, tags=[RunTag(TAG_CHECKPOINT, path), RunTag(TAG_CHECKPOINT_EPOCH, str(epoch))])

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # A worker or node died: Tune restarts the trial from its latest checkpoint, in the same run.
        from mlflow.entities import RunTag

        reason = error_summary(trial)
        counted: list[int] = []  # once, even if the update is retried

        def update() -> None:
            if not counted:
                counted.append(self.restarts.get(trial.trial_id, 0) + 1)
                self.restarts[trial.trial_id] = counted[0]
            count = counted[0]
            self.client.log_batch(self.runs[trial.trial_id], tags=[
                RunTag(TAG_RESTARTS, str(count)), RunTag(TAG_LAST_RESTART, reason[:5000] or "unknown")])

        self._submit(update)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self.runs:
            return
        reason = self.failed.get(trial.trial_id)
        if reason is None:
            self._submit(lambda: self._upload_missing_export(trial.trial_id))

        def update() -> None:
            run_id, reached = self.runs[trial.trial_id], self.last_epoch.get(trial.trial_id, 0)
            if reason is not None:
                self.client.set_tag(run_id, TAG_ERROR, reason[:5000])
                self.client.log_text(run_id, reason + "\n", "error.txt")  # whole, as for a trial that raised
                self.client.set_terminated(run_id, "FAILED")
            elif reached < self.spec.training.epochs:
                self.client.set_tag(run_id, TAG_STOPPED_AT, str(reached))
                self.client.set_terminated(run_id, "KILLED")
            else:
                self.client.set_terminated(run_id, "FINISHED")

        self._submit(update)
        self._submit_figures(trial)

    def _upload_missing_export(self, trial_id: str) -> None:
        """The trial uploads the export of each epoch it may end on (`ssl_tune.trial_record`). Where it could
        not (the server was away, or its node does not see the store), write that export here from the checkpoint
        in Ray's storage and upload it, so that export and `load_backbone` work from any machine that reaches
        the tracking server. Retried like every update while the server is away; Ray's copy is never touched."""
        from ssl_tune.checkpoints import load, write_export
        from ssl_tune.trial_record import EXPORT_ARTIFACT_DIR, TAG_EXPORT_EPOCH

        run_id, source = self.runs[trial_id], self.evaluated_checkpoint.get(trial_id)
        tags = self.client.get_run(run_id).data.tags
        if not source or tags.get(TAG_EXPORT_EPOCH) == tags.get(TAG_CHECKPOINT_EPOCH):
            return
        import tempfile

        with contextlib.ExitStack() as stack:
            try:
                directory = stack.enter_context(checkpoint_on_disk(source))
                state = load(directory / "checkpoint.pt") if directory is not None else None
            except Exception as exc:  # the checkpoint's storage, not MLflow: retrying would hold every update
                directory, reason = None, f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            else:
                reason = "is gone"
            if directory is None:
                print(f"warning: trial {trial_id}'s checkpoint {source} {reason}; its export is not in MLflow",
                      file=sys.__stderr__)
                return
            out = write_export(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ssl-tune-export-"))), state,
                               run_id=run_id)
            self.client.log_artifacts(run_id, str(out), EXPORT_ARTIFACT_DIR)
        self.client.set_tag(run_id, TAG_CHECKPOINT_ARTIFACT, EXPORT_ARTIFACT_DIR)
        self.client.set_tag(run_id, TAG_EXPORT_EPOCH, str(state["epoch"]))

    def _submit_figures(self, trial) -> None:
        """The trial's figures, then the search's, refreshed as each trial ends. Best effort: a
        figure that cannot be drawn is reported and skipped, never held (the search's figures are
        drawn again at the end); while the server is unreachable they wait like any update."""
        confirming = CONFIRMATION_KEY in trial.config  # the search's trials, and so its figures, are done

        def update() -> None:
            log_trial_figures(self.client, self.runs[trial.trial_id], self.last_checkpoint.get(trial.trial_id))
            if not confirming:
                log_search_figures(self.client, self.client.get_run(self.parent_run_id), self.spec)

        self.writer.submit(update, best_effort=f"figures after trial {trial.trial_id}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id not in self.runs:
            return
        traceback_text = error_text(trial)

        def update() -> None:
            run_id = self.runs[trial.trial_id]
            self.client.set_tag(run_id, TAG_ERROR, last_line(traceback_text))
            if traceback_text:
                self.client.log_text(run_id, traceback_text, "error.txt")
            self.client.set_terminated(run_id, "FAILED")

        self._submit(update)
        self._submit_figures(trial)


# --- checkpoints ---------------------------------------------------------------------------------


@contextlib.contextmanager
def checkpoint_on_disk(path: str):
    """A checkpoint directory as a local path: itself, or for a URI (s3://, gs://, ...) a temporary
    copy made with pyarrow's file systems (which Ray's storage uses); None if it does not exist."""
    if "://" not in path:
        yield Path(path) if Path(path).is_dir() else None
        return
    import tempfile

    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ssl-tune-checkpoint-") as tmp:
        pyarrow.fs.copy_files(inner, tmp, source_filesystem=filesystem)
        yield Path(tmp)


@contextlib.contextmanager
def checkpoint_of(client, run):
    """The local directory of a trial run's checkpoint (of its last evaluated epoch): Ray's copy, with the whole
    training state, when this machine sees it; else the export the trial uploaded to its run's artifacts
    (`ssl_tune.trial_record`; downloaded to a temporary directory), with what `load_backbone` needs."""
    import tempfile

    tagged = run.data.tags.get(TAG_CHECKPOINT)
    with checkpoint_on_disk(tagged) if tagged else contextlib.nullcontext() as local:
        if local is not None:
            yield local
            return
    artifact = run.data.tags.get(TAG_CHECKPOINT_ARTIFACT)
    if not artifact:
        raise LookupError(f"trial run {run.info.run_id} has no checkpoint on this machine ({tagged or 'none logged'}) "
                          "and no export among its MLflow artifacts (it ended before uploading one)")
    with tempfile.TemporaryDirectory(prefix="ssl-tune-checkpoint-") as tmp:
        yield Path(client.download_artifacts(run.info.run_id, artifact, tmp))


# --- figures -----------------------------------------------------------------------------------


def log_figure(client, run_id: str, fig, name: str) -> None:
    client.log_figure(run_id, fig, f"{figures.FIGURE_DIR}/{name}.png")
    figures.close(fig)


def log_trial_figures(client, run_id: str, checkpoint_dir: str | None) -> None:
    """A trial's loss-term curves from its metric history, and the figures of the final evaluation
    arrays the trainer saved next to its final checkpoint (if that directory is on this machine)."""
    run = client.get_run(run_id)
    names = figures.loss_term_names(list(run.data.metrics))
    histories = {n: [(m.step, m.value) for m in client.get_metric_history(run_id, n)] for n in names}
    if histories:
        log_figure(client, run_id, figures.loss_terms_figure(histories), "loss_terms")
    arrays = Path(checkpoint_dir) / EVALUATION_FILE if checkpoint_dir else None
    if arrays is not None and arrays.is_file():
        for name, fig in figures.evaluation_figures(load_arrays(arrays)).items():
            log_figure(client, run_id, fig, name)


def log_search_figures(client, parent, spec: SpecBase) -> dict[str, float]:
    """Refresh a search's figures and parameter importances from its trials' runs; returns the importances.

    The Optuna plots use a study rebuilt from the runs (each trial that did not fail with the value
    of its last epoch, as the search's own study received it), so they are the same during a search,
    after it and after `ssl-tune resume`.
    """
    import optuna

    metric, mode = spec.search.metric, spec.search.mode
    runs = child_runs(client, parent)
    run_id = parent.info.run_id
    if runs:
        curves = [(run.info.run_name, [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)],
                   run.info.status) for run in runs]
        log_figure(client, run_id, figures.learning_curves_figure(curves, metric, mode, spec.training.epochs),
                   "learning_curves")
    if len(spec.method_names()) > 1:
        log_figure(client, run_id, figures.methods_figure(_method_points(runs, metric), metric, mode,
                                                          spec.training.epochs), "methods")
    finished = [(run.data.params, run.data.metrics[metric]) for run in runs
                if counts(run.data.metrics.get(metric)) and run.info.status != "FAILED"]
    if not finished:
        return {}
    study = study_from_trials(spec, finished, mode)
    varied = [p for p in spec.search_ranges() if len({t.params.get(p) for t in study.trials}) > 1]
    importances: dict[str, float] = {}
    if len(study.trials) >= 2 and varied:
        importances = optuna.importance.get_param_importances(study, params=varied)
    for name, fig in figures.study_figures(study, varied, metric, mode).items():
        log_figure(client, run_id, fig, name)
    if importances:
        log_metrics(client, run_id, {f"importance.{p}": v for p, v in importances.items()}, step=len(study.trials))
    return importances


def _method_points(runs: list, metric: str) -> dict[str, list[tuple[int, float, int]]]:
    """Method -> (order started, objective, epochs reached) of every trial that did not fail."""
    points: dict[str, list[tuple[int, float, int]]] = collections.defaultdict(list)
    for order, run in enumerate(sorted(runs, key=lambda r: r.info.start_time)):
        value = run.data.metrics.get(metric)
        if counts(value) and run.info.status != "FAILED":
            points[run.data.params.get("method.name", "?")].append((order, value, int(run.data.metrics.get("epoch", 0))))
    return dict(sorted(points.items()))


def best_per_method(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """A search across methods: each method's best trial (`space.best_trial`), best first."""
    methods = dict.fromkeys(r["method.name"] for r in rows if "method.name" in r)
    best = [best_trial([r for r in rows if r["method.name"] == m], mode) for m in methods]
    return ranked([b for b in best if b is not None], mode)


# --- the search's parent run --------------------------------------------------------------------


def open_search_run(client, experiment: str, run_name: str, spec: SpecBase, *, spec_source: str, ray_address: str,
                    experiment_dir: str, max_concurrent: int, data: Any = None) -> str:
    """Create a search's parent run: tags (what `resume`, `results` and `export` read back), the spec as
    `spec.yaml`, the search's settings and the data cache as params. Returns its run id."""
    import yaml

    from ssl_tune import __version__

    parent = client.create_run(experiment, run_name=run_name, tags={
        TAG_KIND: "search",
        "ssl_tune.spec_hash": spec.digest(),
        "ssl_tune.spec_source": spec_source,
        "ssl_tune.git_commit": _git_commit(),
        "ssl_tune.ray_address": ray_address,
        "ssl_tune.version": __version__,
        TAG_STORAGE: experiment_dir,
        TAG_METRIC: spec.search.metric,
        TAG_MODE: spec.search.mode,
        TAG_SEARCHED: ",".join(spec.searchable_paths()),
        TAG_METHOD: ",".join(spec.method_names()),
    })
    parent_id = parent.info.run_id
    client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    log_params(client, parent_id, {"num_samples": spec.search.num_samples, "max_concurrent": max_concurrent,
                                   "scheduler": spec.search.scheduler, "metric": spec.search.metric})
    if data is not None:  # the driver's node's cache; every node builds or reuses its own
        log_params(client, parent_id, {"data.cache": data.path,
                                       "data.train_images": data.manifest["splits"]["train"]["shape"][0]})
        log_metrics(client, parent_id, {"data_skipped_corrupt": data.skipped}, step=0)
    return parent_id


def reopen_search_run(client, parent) -> None:
    """Mark an interrupted search's parent run as running again, counting the resumes."""
    client.update_run(parent.info.run_id, status="RUNNING")
    client.set_tag(parent.info.run_id, "ssl_tune.resumed", str(int(parent.data.tags.get("ssl_tune.resumed", "0")) + 1))


def close_search_run(client, parent_id: str, *, interrupted: bool, spec: SpecBase | None = None,
                     trials_ok: int = 0, confirming: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """End a search's MLflow record; returns the leaderboard and the best trial's run id.

    Interrupted: every unfinished child run and the parent end KILLED, ready for `ssl-tune resume`.
    Finished: the best trial (`space.best_trial`) is recorded on the parent (tag, `best.*` params and
    `best_*` metrics) with the leaderboard and the search's figures, and the parent ends FINISHED, or
    FAILED when no trial came through; with `confirming` it stays RUNNING for the confirmation stage
    (`record_confirmation` ends it).
    """
    parent = client.get_run(parent_id)
    # Runs still RUNNING belong to trials stopped by Ctrl-C/SIGTERM, or to a driver that died before.
    close_unfinished(client, parent)
    if interrupted:
        client.set_terminated(parent_id, "KILLED")
        return (leaderboard(client, parent) if spec is not None else []), None
    rows = leaderboard(client, parent)
    best = best_trial(rows, spec.search.mode)
    if best is not None and not confirming:  # else the confirmed winner is recorded (MLflow params are written once)
        _record_best(client, parent_id, best["run_id"], spec)
    client.log_text(parent_id, format_table(rows), "trials.txt")
    if len(spec.method_names()) > 1:
        per_method = best_per_method(rows, spec.search.mode)
        client.log_text(parent_id, format_table(per_method), "best_per_method.txt")
        log_metrics(client, parent_id, {f"best_{spec.search.metric}.{r['method.name']}": r["objective"]
                                        for r in per_method}, step=0)
    try:
        log_search_figures(client, client.get_run(parent_id), spec)
    except Exception as exc:  # figures are a view of the results: never lose the finished search over one
        print(f"warning: the search's figures were not logged ({type(exc).__name__}: {exc})", file=sys.__stderr__)
    if confirming:
        client.set_tag(parent_id, TAG_STAGE, KIND_CONFIRMATION)
    else:
        # A search in which no trial came through did not find anything: FAILED, and a non-zero exit.
        client.set_terminated(parent_id, "FINISHED" if trials_ok else "FAILED")
    return rows, best["run_id"] if best else None


def _record_best(client, parent_id: str, run_id: str, spec: SpecBase) -> None:
    """The run export takes, on the parent: its id, its searched values (`best.*`), its metrics (`best_*`)."""
    run = client.get_run(run_id)
    client.set_tag(parent_id, TAG_BEST_TRIAL_RUN, run_id)
    log_params(client, parent_id, {f"best.{p}": run.data.params.get(p) for p in spec.searchable_paths()})
    log_metrics(client, parent_id, {f"best_{k}": v for k, v in run.data.metrics.items()}, step=0)


def confirmation_table(client, parent, trials: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per confirmed configuration, best mean first (`confirmation.summarise`): what it
    confirms (a search trial's run id, or "default"), its searched values, seeds, mean, SD, 95%
    interval, the paired gain over the default with its interval, and `run_id`, its best seed's run
    (what export takes for the winner). `trials`: the search's leaderboard, if the caller has it."""
    metric, mode = parent.data.tags.get(TAG_METRIC, "knn_top1"), parent.data.tags.get(TAG_MODE, "max")
    searched = [p for p in parent.data.tags.get(TAG_SEARCHED, "").split(",") if p]
    objectives: dict[str, dict[int, float]] = collections.defaultdict(dict)
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in child_runs(client, parent, KIND_CONFIRMATION):
        # Only a run trained to the end is a confirmation; a failed one's last value is not a result.
        value = run.data.metrics.get(metric, math.nan) if run.info.status == "FINISHED" else math.nan
        of = run.data.tags.get(TAG_CONFIRMS, "")
        objectives[of][int(run.data.tags.get(TAG_SEED, -1))] = value
        runs[of].append({"objective": value, "status": run.info.status, "run_id": run.info.run_id,
                         "params": run.data.params})
    rows = confirmation_stage.summarise(objectives, mode)
    search_rank = {r["run_id"]: r["rank"] for r in (trials if trials is not None else leaderboard(client, parent))}
    for row in rows:
        of = row["confirms"]
        row["configuration"] = of if of == confirmation_stage.DEFAULT else f"search #{search_rank.get(of, '?')}"
        best = best_trial(runs[row["confirms"]], mode)
        params = runs[row["confirms"]][0]["params"]
        row.update({p: param_value(params.get(p)) for p in searched})
        row["run_id"] = best["run_id"] if best else None
    return rows


def record_confirmation(client, parent_id: str, spec: SpecBase) -> tuple[list[dict[str, Any]], str, str | None]:
    """End the confirmation stage's record: the table (`confirmation.txt`), the winner's interval and
    its gain over the default as `confirmed_*`, `default_*` and `gain_*` metrics, the verdict as tags;
    the winner's best seed is the run export takes (the parent's best-run tag, `best.*` params and
    `best_*` metrics). The parent ends FINISHED; when no confirmation run finished, the search's
    best single run is recorded instead. Returns the table, the verdict and the
    exported run's id."""
    parent = client.get_run(parent_id)
    close_unfinished(client, parent)
    rows = confirmation_table(client, parent)
    verdict = confirmation_stage.verdict(rows)
    winner = confirmation_stage.winner(rows)
    client.log_text(parent_id, format_table(rows, confirmation_columns(rows)) + f"\n\n{verdict}\n", "confirmation.txt")
    client.set_tag(parent_id, TAG_VERDICT, verdict[:5000])
    if winner is None:  # no confirmation came through: the search's best single run is all there is
        best = best_trial(leaderboard(client, parent), spec.search.mode)
        if best is not None:
            _record_best(client, parent_id, best["run_id"], spec)
        client.set_terminated(parent_id, "FINISHED")
        return rows, verdict, None
    default = next((r for r in rows if r["confirms"] == confirmation_stage.DEFAULT), None)
    metrics = {"confirmed_mean": winner["mean"], "confirmed_sd": winner["sd"],
               "confirmed_ci95_low": winner["ci95_low"], "confirmed_ci95_high": winner["ci95_high"],
               "confirmed_seeds": winner["seeds"]}
    if default is not None:
        metrics.update({"default_mean": default["mean"], "default_ci95_low": default["ci95_low"],
                        "default_ci95_high": default["ci95_high"]})
    if "gain_over_default" in winner:
        metrics.update({k: winner[k] for k in ("gain_over_default", "gain_ci95_low", "gain_ci95_high")})
        client.set_tag(parent_id, TAG_BEATS_DEFAULT, str(bool(winner["beats_default"])).lower())
    log_metrics(client, parent_id, {k: v for k, v in metrics.items() if counts(v)}, step=0)
    _record_best(client, parent_id, winner["run_id"], spec)
    client.set_tag(parent_id, TAG_STAGE, "done")
    client.set_terminated(parent_id, "FINISHED")
    return rows, verdict, winner["run_id"]


def confirmation_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The confirmation table's printed columns (run ids left out)."""
    keys = dict.fromkeys(k for row in rows for k in row)  # the default's row has no gain columns
    return ["configuration"] + [c for c in keys if c not in ("run_id", "objective", "confirms", "configuration")]


def close_unfinished(client, parent) -> None:
    for child in child_runs(client, parent, kind=None):
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, TAG_INTERRUPTED_AT, str(int(child.data.metrics.get("epoch", 0))))
            client.set_terminated(child.info.run_id, "KILLED")



def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""



# --- reading a search back ---------------------------------------------------------------


def find_parent_run(client, experiment_or_run: str, *, unfinished: bool = False):
    """A search's parent run from its run id, a trial's run id, the search's name (`ssl-tune run
    --name`) or an experiment name (its latest search; with `unfinished`, its one unfinished search).

    Raises LookupError naming the candidates when a name fits more than one search.
    """
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(experiment_or_run)
    except MlflowException:
        run = None
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        return client.get_run(parent) if parent else run
    is_search = f"tags.`{TAG_KIND}` = 'search'"
    quote = "'" if "'" not in experiment_or_run else '"'
    all_experiments = [e.experiment_id for e in client.search_experiments(max_results=50000)]
    named = client.search_runs(
        all_experiments, filter_string=f"{is_search} and attributes.run_name = {quote}{experiment_or_run}{quote}",
        order_by=["attributes.start_time DESC"], max_results=100) if all_experiments and '"' not in experiment_or_run else []
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise LookupError(f"{len(named)} searches are named {experiment_or_run!r}; give one run id:\n"
                          + _candidates(client, named))
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
        metric, mode = search.data.tags.get(TAG_METRIC, "knn_top1"), search.data.tags.get(TAG_MODE, "max")
        children = trials[search.info.run_id]
        best = best_trial([{"objective": c.data.metrics.get(metric, math.nan), "status": c.info.status} for c in children],
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
    best = best_trial(leaderboard(client, parent), parent.data.tags.get(TAG_MODE, "max"))
    return best["run_id"] if best else None


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
            **{p: param_value(run.data.params.get(p)) for p in searched},
            "objective": m.get(metric, math.nan),
            "status": run.info.status,
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
