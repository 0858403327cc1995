"""Completing a search's MLflow record from Ray Tune's own files.

The driver writes MLflow from Tune callbacks (`tracking.MlflowTrialLogger`); while the tracking
server is away it holds the updates, and gives them up if the server is still away when the search
ends. Tune's files under the storage path keep everything regardless: every result of every trial
(`result.json`, one JSON object per reported epoch), each trial's end (error or not) and its
checkpoints. `ssl-tune resume` replays them here, through the same logger, so the record is the
one the callbacks would have written: each epoch once (the logger skips epochs the run holds), the
checkpoint tags and the artifact copy, and the final status. Replaying twice changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports this module for `TrackingIncomplete` alone: no Ray for `--help`
    from ssl_tune.tracking import MlflowTrialLogger


class TrackingIncomplete(RuntimeError):
    """The search (or stage) ended, but MLflow could not be given all of it; Tune's files hold the rest."""

    def __init__(self, uri: str, parent_run_id: str, storage: str, reason: str) -> None:
        super().__init__(f"MLflow at {uri} did not take the end of the search ({reason})")
        self.uri, self.parent_run_id, self.storage, self.reason = uri, parent_run_id, storage, reason


class StorageFull(RuntimeError):
    """The disk of the search's storage path filled during the search; Tune stopped it."""

    def __init__(self, storage: str, parent_run_id: str, uri: str, detail: str = "") -> None:
        super().__init__(f"the disk of the storage path {storage} is full" + (f" ({detail})" if detail else ""))
        self.storage, self.parent_run_id, self.uri = storage, parent_run_id, uri


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
    from ssl_tune.trial import FAILURE_KEY

    client = logger.client
    parent = client.get_run(logger.parent_run_id)
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
        error_file = Path(result.path) / "error.txt" if "://" not in result.path else None
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
        raise ConnectionError(f"{logger.writer.pending} MLflow updates still held after {timeout:g} s")
    if replayed:
        print(f"completed the MLflow record of {replayed} trial(s) from Tune's result files", file=sys.__stdout__,
              flush=True)
    return replayed
