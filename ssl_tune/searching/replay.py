"""Completing a search's MLflow record from Ray Tune's own files.

The driver writes MLflow from Tune callbacks (`tracking.MlflowTrialLogger`); while the tracking
server is away it holds the updates, and gives them up if the server is still away when the search
ends. Tune's files under the storage path keep everything regardless: every result of every trial
(`result.json`, one JSON object per reported epoch), each trial's end (error or not) and its
checkpoints. `ssl-tune resume` replays them here, through the same logger, so the record is the
one the callbacks would have written: each epoch once (the logger skips epochs the run holds), the
checkpoint tags and the artifact copy, and the final status. Replaying twice changes nothing.

Each search has its own folder of Tune state, and every trial's config names its search's parent run
(`space.SEARCH_RUN_KEY`): restoring and replaying take only the resumed search's own trials
(`check_owned`), so a folder that two searches shared (before each had its own) is refused, not mixed.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ssl_tune.spec import SpecError
from ssl_tune.storage_path import StoragePath

if TYPE_CHECKING:  # the CLI imports this module for `TrackingIncomplete` alone: no Ray for `--help`
    from ssl_tune.tracking import MlflowTrialLogger


class TrackingIncomplete(RuntimeError):
    """The search (or stage) ended, but MLflow could not be given all of it; Tune's files hold the rest."""

    def __init__(self, uri: str, parent_run_id: str, storage: StoragePath, reason: str) -> None:
        super().__init__(f"MLflow at {uri} did not take the end of the search ({reason})")
        self.uri, self.parent_run_id, self.storage, self.reason = uri, parent_run_id, storage, reason


class StorageFull(RuntimeError):
    """The disk of the search's storage path filled during the search; Tune stopped it."""

    def __init__(self, storage: StoragePath, parent_run_id: str, uri: str, detail: str = "") -> None:
        super().__init__(f"the disk of the storage path {storage} is full" + (f" ({detail})" if detail else ""))
        self.storage, self.parent_run_id, self.uri = storage, parent_run_id, uri


class SearchMismatch(SpecError):
    """Tune's files that a search names hold another search's trials; nothing of them is restored or replayed."""


def check_owned(client, parent, results, action: str) -> None:
    """Raise SearchMismatch, a line that begins with `action` and names both searches, if `results` (a Tune
    ResultGrid) hold a trial of another search than `parent`'s. A trial names its search in its config
    (`space.SEARCH_RUN_KEY`); one from before that is looked up by its trial id among the MLflow runs of
    the parent's experiment."""
    from ssl_tune import tracking
    from ssl_tune.searching.space import SEARCH_RUN_KEY

    parent_id = parent.info.run_id
    owners = {str(r.config[SEARCH_RUN_KEY]) for r in results if SEARCH_RUN_KEY in (r.config or {})}
    unnamed = {str(r.metrics["trial_id"]) for r in results
               if SEARCH_RUN_KEY not in (r.config or {}) and "trial_id" in (r.metrics or {})}
    if unnamed:
        runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` != 'search'",
                                  max_results=50000)
        owners |= {r.data.tags.get("mlflow.parentRunId", "") for r in runs if r.data.tags.get(tracking.TAG_TRIAL_ID) in unnamed}
    others = sorted(owners - {parent_id, ""})
    if others:
        raise SearchMismatch(f"{action}: Tune's state at {_folder_of(results)} holds trials of {_named(client, others[0])}, "
                             f"not of {_named(client, parent_id)}; a search restores and replays its own trials only")


def check_state_owned(client, parent, experiment_dir: StoragePath) -> None:
    """`check_owned` over the trials of the Tune state saved at `experiment_dir`, read without starting Ray. Like
    `Tuner.restore`, this unpickles parts of that state: call it only on a directory the user vouched for."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    try:
        results = ResultGrid(ExperimentAnalysis(str(experiment_dir)))
    except (ValueError, OSError):  # no trial state to read (`Tuner.restore` then starts the search's trials afresh)
        return
    check_owned(client, parent, results, "resume")


def _folder_of(results) -> str:
    return getattr(results, "experiment_path", "") or "the search's folder"


def _named(client, run_id: str) -> str:
    """'search NAME (RUN_ID)', or 'search RUN_ID' where that run is gone."""
    from mlflow.exceptions import MlflowException

    try:
        return f"search {client.get_run(run_id).info.run_name!r} ({run_id})"
    except MlflowException:
        return f"search {run_id} (no longer in the tracking store)"


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a call to an unreachable tracking server raises (MLflow wraps most, not all, of them)."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.exceptions.RequestException, ConnectionError, TimeoutError


def result_lines(result) -> list[dict[str, Any]]:
    """Every result a Tune trial reported, in order, from its `result.json` (on any storage Tune uses)."""
    path = f"{result.path.rstrip('/')}/result.json"
    try:
        with result.filesystem.open_input_stream(path) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _settled(run, last_epoch: int) -> bool:
    """Whether a trial's run already holds its end: a final status and every epoch Tune has."""
    from ssl_tune import tracking

    ended = run.info.status in ("FINISHED", "FAILED") or tracking.TAG_STOPPED_AT in run.data.tags
    return ended and int(run.data.metrics.get("epoch", 0)) >= last_epoch


def replay(results, logger: MlflowTrialLogger, *, timeout: float | None = None) -> int:
    """Write into MLflow what `results` (a Tune ResultGrid of ended trials) hold and it lacks; returns
    how many trials needed it. Raises the tracking error if the server does not take it in `timeout` s."""
    from ssl_tune import tracking
    from ssl_tune.trials.runner import FAILURE_KEY

    client = logger.client
    parent = client.get_run(logger.parent_run_id)
    check_owned(client, parent, results, "replay")
    runs = {r.data.tags.get(tracking.TAG_TRIAL_ID): r for r in tracking.child_runs(client, parent, kind=None)}
    replayed = 0
    for result in results:
        lines = result_lines(result)
        if not lines:
            continue
        trial_id = str(lines[-1].get("trial_id", ""))
        last_epoch = max(int(line.get("epoch", 0)) for line in lines)
        if trial_id in runs and _settled(runs[trial_id], last_epoch):
            continue
        replayed += 1
        trial_dir = StoragePath.of(result.path).local
        error_file = trial_dir / "error.txt" if trial_dir else None
        trial = SimpleNamespace(trial_id=trial_id, config=result.config or lines[-1].get("config", {}),
                                error_file=str(error_file) if error_file and error_file.is_file() else None,
                                last_result=lines[-1])
        logger.on_trial_start(0, [], trial)
        for line in lines:
            logger.on_trial_result(0, [], trial, line)
            if line.get("checkpoint_dir_name") and FAILURE_KEY not in line:  # a one-worker trial's checkpoint
                logger.checkpoint_reported(trial_id, f"{result.path.rstrip('/')}/{line['checkpoint_dir_name']}",
                                           line.get(logger.metric), int(line.get("epoch", 0)))
        if result.error is not None:
            logger.on_trial_error(0, [], trial)
        else:
            logger.on_trial_complete(0, [], trial)
    timeout = tracking.final_flush_s() if timeout is None else timeout
    if not logger.writer.drain(timeout):
        raise ConnectionError(f"{logger.writer.pending} MLflow updates still held: the server did not answer for {timeout:g} s")
    if replayed:
        print(f"completed the MLflow record of {replayed} trial(s) from Tune's result files", file=sys.__stdout__,
              flush=True)
    return replayed
