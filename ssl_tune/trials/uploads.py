"""What a trial uploads to its own MLflow run from its own process; the driver's callback
(`ssl_tune.tracking.MlflowTrialLogger`) writes everything else.

* **System metrics**: MLflow's own monitor (CPU, memory, disk, network, and GPU utilisation and memory
  where there are GPUs), sampled every `SYSTEM_METRICS_INTERVAL_S` seconds in the process that trains.
* **The export** that `load_backbone` and `ssl-tune export` need (`ssl_tune.trials.checkpoints.write_export`:
  weights, spec, input contract, metrics; no optimizer state) of each epoch at which the trial may end:
  ASHA's decision epochs and the last. It goes into the run's `export/` artifacts, from this process,
  so the bytes never pass through the driver. Ray's storage keeps the full training state for restarts.

Both are best effort, and training never waits on a tracking server that is away: system metrics stop
(MLflow's monitor ends on an error), and an upload that failed once is retried in the background until it
goes up, a newer export replaces it, or the trial ends. The driver then uploads the export of the trial's
objective from Ray's storage (`MlflowTrialLogger`), as it does for a trial whose node cannot see the store.
"""

from __future__ import annotations

import queue
import shutil
import sys
import threading
import time
from pathlib import Path

# On trials (set by the driver): the Tune trial id, by which a trial finds its own run.
TAG_TRIAL_ID = "ssl_tune.trial_id"
# On trials (set by the trial): the artifact folder holding its export, and the export's epoch.
TAG_CHECKPOINT_ARTIFACT = "ssl_tune.checkpoint_artifact"
TAG_EXPORT_EPOCH = "ssl_tune.export_epoch"
EXPORT_ARTIFACT_DIR = "export"

SYSTEM_METRICS_INTERVAL_S = 10.0
RUN_WAIT_S = 300.0  # the driver creates the run as Tune starts the trial; the trial can get here first
UPLOAD_RETRY_S = 600.0
CLOSE_WAIT_S = 300.0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class TrialRecorder:
    """Finds the trial's MLflow run, runs MLflow's system-metrics monitor on it (`system_metrics`), and
    uploads the exports given to `upload_export`, newest first, on one background thread."""

    def __init__(self, uri: str, parent_run_id: str, trial_id: str, *, system_metrics: bool = True,
                 node_id: str | None = None) -> None:
        self.uri, self.parent_run_id, self.trial_id = uri, parent_run_id, trial_id
        self.system_metrics, self.node_id = system_metrics, node_id
        self.run_id: str | None = None
        self._exports: queue.Queue[tuple[Path, threading.Event] | None] = queue.Queue()
        self.uploaded: Path | None = None  # the last export that reached the run
        self._closing = threading.Event()
        self._lookup_error = ""  # why the run was not found yet
        self._thread = threading.Thread(target=self._work, name="ssl-tune-trial-record", daemon=True)
        self._thread.start()

    def upload_export(self, directory: Path) -> bool:
        """Upload this export directory (then delete it), waiting until it is in the run's artifacts, or until
        one attempt failed; True if it went up. Ray may end the trial's process as soon as the trial reports
        the epoch on which ASHA stops it, so the trial waits before reporting: seconds, at a few epochs of a
        trial. While the server is away the upload goes on in the background, and one given later replaces it."""
        done = threading.Event()
        self._exports.put((directory, done))
        if self.run_id is None:  # still looking for its run (or none found): upload once it is found
            return False
        done.wait()
        return self.uploaded == directory

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Let a pending upload finish its current attempt (up to `timeout` s) and stop the system metrics.
        An export that did not go up is uploaded by the driver from Ray's storage when the trial ends."""
        self._closing.set()
        self._exports.put(None)
        self._thread.join(timeout)

    # --- the background thread --------------------------------------------------------------------

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    def _find_run(self) -> str | None:
        query = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{self.trial_id}'"
        deadline = time.monotonic() + RUN_WAIT_S
        while time.monotonic() < deadline and not self._closing.is_set():
            try:
                client = self._client()
                experiment = client.get_run(self.parent_run_id).info.experiment_id
                found = client.search_runs([experiment], filter_string=query, max_results=1)
                if found:
                    return found[0].info.run_id
                self._lookup_error = "no such run yet"
            except Exception as exc:  # the server is away: keep looking until the deadline
                self._lookup_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            time.sleep(1.0)
        return None

    def _work(self) -> None:
        self.run_id = self._find_run()
        if self.run_id is None and not self._closing.is_set():
            _warn(f"trial {self.trial_id} found no MLflow run of its own in {self.uri} within {RUN_WAIT_S:.0f} s "
                  f"({self._lookup_error}): no system metrics, and its exports stay in Ray's storage, from which the "
                  "driver uploads the last one")
        monitor = self._start_monitor() if self.run_id and self.system_metrics else None
        while True:
            item = self._exports.get()
            while item is not None and not self._exports.empty():  # only the newest export matters
                shutil.rmtree(item[0], ignore_errors=True)
                item[1].set()
                item = self._exports.get()
            if item is None:
                break
            directory, done = item
            if self.run_id and self._upload(directory, done):
                self.uploaded = directory
            shutil.rmtree(directory, ignore_errors=True)
            done.set()
        if monitor is not None:
            monitor.finish()

    def _start_monitor(self):
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a restarted trial continues the steps of its earlier attempt
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                           resume_logging=True, node_id=self.node_id, tracking_uri=self.uri)
            monitor.start()
            return monitor
        except Exception as exc:  # psutil missing, NVML broken: the trial trains on without them
            _warn(f"no system metrics for trial {self.trial_id}: {type(exc).__name__}: {exc}")
            return None

    def _upload(self, directory: Path, done: threading.Event) -> bool:
        """Upload, retrying every 5 s for up to UPLOAD_RETRY_S; after the first failed attempt `done` is set,
        so that the trial goes on training. Gives up early when a newer export waits or the trial ends."""
        import json

        epoch = str(json.loads((directory / "metrics.json").read_text())["epoch"])
        deadline = time.monotonic() + UPLOAD_RETRY_S
        while True:
            try:
                client = self._client()
                client.log_artifacts(self.run_id, str(directory), EXPORT_ARTIFACT_DIR)
                client.set_tag(self.run_id, TAG_CHECKPOINT_ARTIFACT, EXPORT_ARTIFACT_DIR)
                client.set_tag(self.run_id, TAG_EXPORT_EPOCH, epoch)
                return True
            except Exception as exc:
                done.set()
                if time.monotonic() > deadline or not self._exports.empty() or self._closing.is_set():
                    _warn(f"trial {self.trial_id}'s export of epoch {epoch} was not uploaded to {self.uri}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    return False
                time.sleep(5.0)


def reachable_here(uri: str) -> bool:
    """Whether this node sees the tracking store: a server always; a file or sqlite store only where its
    path exists (on another node MLflow would create an empty store of its own there)."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme.split("+")[0] in ("http", "https", "databricks", "postgresql", "mysql", "mssql"):
        return True
    path = uri.removeprefix("sqlite:///") if parsed.scheme == "sqlite" else (parsed.path if parsed.scheme == "file" else uri)
    return Path(path).exists()
