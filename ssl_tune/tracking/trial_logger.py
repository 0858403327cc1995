"""The Tune callback that writes each trial's MLflow run."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from ssl_tune.searching.space import CONFIRMATION_KEY, field_values, origin, resolve_trial
from ssl_tune.spec import SpecBase
from ssl_tune.storage_path import StoragePath
from ssl_tune.tracking.artifacts import checkpoint_on_disk, log_search_figures, log_trial_figures
from ssl_tune.tracking.store import client_for, log_metrics, log_params
from ssl_tune.tracking.tags import (KIND_CONFIRMATION, KIND_TRIAL, TAG_CHECKPOINT, TAG_CHECKPOINT_ARTIFACT,
                                    TAG_CHECKPOINT_EPOCH, TAG_CONFIRMS, TAG_DAMAGED_CHECKPOINT, TAG_EPOCHS_LOST,
                                    TAG_ERROR, TAG_IDENTITY, TAG_KIND, TAG_LAST_RESTART, TAG_METHOD, TAG_ORIGIN,
                                    TAG_RESTARTS, TAG_ROUND, TAG_SEED, TAG_STOPPED_AT, TAG_TRIAL_ID)
from ssl_tune.tracking.writer import MlflowWriter, _given_up, final_flush_s
from ssl_tune.trials.runner import (DAMAGED_CHECKPOINT_KEY, FAILURE_KEY, RESTORED_FROM_KEY, RESTORED_HISTORY_KEY,
                            STORAGE_FULL_KEY, error_summary, error_text, last_line)

# Keys Tune or Ray Train add to a result, and ours that are not metrics.
NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_id", "experiment_tag", "checkpoint_path",
                                       "should_checkpoint", "iterations_since_restore", "time_since_restore"}


# While a search runs, its figures are drawn again as a trial ends, at most this often: drawing them costs the
# driver about a second, which trials of seconds (a proxy search) would pay again and again. The search's end
# always draws them.
SEARCH_FIGURES_EVERY_S = 60.0


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's metrics in a Tune result: numbers that are not Tune's bookkeeping."""
    return {k: float(v) for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


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

    def __init__(self, uri: str, experiment: str, parent_run_id: str, spec: SpecBase,
                 origins: Sequence[tuple[dict[str, Any], str]] = ()) -> None:
        self.uri, self.experiment, self.parent_run_id, self.spec = uri, experiment, parent_run_id, spec
        self.origins = list(origins)  # the points tried first, and where each came from (`space.origin`)
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
        self._search_figures_at = time.monotonic()  # when the search's figures were last drawn (or it started)
        self._writer: MlflowWriter | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into Tune's experiment state: a resumed search rebuilds the rest from MLflow.
        state = self.__dict__.copy()
        for key in ("runs", "last_epoch", "restarts", "epochs_lost", "failed", "last_checkpoint", "evaluated_checkpoint",
                    "_search_figures_at", "_writer"):
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
        print(f"warning: {self.writer.pending} MLflow updates could not be written to {self.uri}, which did not answer "
              f"for {final_flush_s():g} s; the metrics are in Tune's result files under the search's storage directory",
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
                # (a round of a search confirmed before racing, resumed, has neither)
                tags.update({tag: str(confirmation[key]) for tag, key in ((TAG_ROUND, "round"), (TAG_IDENTITY, "identity"))
                             if key in confirmation})
                name = f"confirm-{confirmation['of'][:8]}-seed{confirmation['seed']}"
            else:
                tags[TAG_ORIGIN] = origin(field_values(trial.config), self.origins)
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
        uri = self._with_scheme(path) or path
        self.last_checkpoint[trial_id] = uri
        self._submit(lambda: self._checkpoint(trial_id, uri, value, epoch))

    def _with_scheme(self, path: str | None) -> str | None:
        """Ray names a checkpoint on object storage by its path inside the bucket; give it back its
        scheme (s3://, gs://) so the tag is a URI that export can open."""
        return StoragePath.of(self.spec.storage_path).with_scheme(path) if path else path

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
        """The trial uploads the export of each epoch it may end on (`ssl_tune.trials.uploads`). Where it could
        not (the server was away, or its node does not see the store), write that export here from the checkpoint
        in Ray's storage and upload it, so that export and `load_backbone` work from any machine that reaches
        the tracking server. Retried like every update while the server is away; Ray's copy is never touched."""
        from ssl_tune.trials.checkpoints import load, write_export
        from ssl_tune.trials.uploads import EXPORT_ARTIFACT_DIR, TAG_EXPORT_EPOCH

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
            if directory is None or state is None:
                print(f"warning: trial {trial_id}'s checkpoint {source} {reason}; its export is not in MLflow",
                      file=sys.__stderr__)
                return
            out = write_export(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ssl-tune-export-"))), state,
                               run_id=run_id)
            self.client.log_artifacts(run_id, str(out), EXPORT_ARTIFACT_DIR)
        self.client.set_tag(run_id, TAG_CHECKPOINT_ARTIFACT, EXPORT_ARTIFACT_DIR)
        self.client.set_tag(run_id, TAG_EXPORT_EPOCH, str(state["epoch"]))

    def _submit_figures(self, trial) -> None:
        """The trial's figures as it ends, then the search's if `SEARCH_FIGURES_EVERY_S` have passed since they
        were last drawn. Best effort: a figure that cannot be drawn is reported and skipped, never held (the
        search's figures are drawn again at the end); while the server is unreachable they wait like any update."""
        confirming = CONFIRMATION_KEY in trial.config  # the search's trials, and so its figures, are done
        search_figures = not confirming and time.monotonic() - self._search_figures_at >= SEARCH_FIGURES_EVERY_S
        if search_figures:
            self._search_figures_at = time.monotonic()

        def update() -> None:
            log_trial_figures(self.client, self.runs[trial.trial_id], self.last_checkpoint.get(trial.trial_id))
            if search_figures:
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
