"""Every environment variable ssl-tune sets in its own process, in one place. Libraries read them when they act
(Tune when a Tuner fits, MLflow when a client connects), so they are set at start-up: a command's, a search's or
a trial's. What a search needs only while it runs is restored after it, so that a notebook's own Tune runs and
MLflow calls see what they saw before."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

# MLflow's usage telemetry: no network call a user did not ask for.
CLIENT_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true"}

# `ssl-tune ui`: MLflow 3's job runner (a consumer process per job queue, for GenAI jobs ssl-tune never submits)
# would start 8 more Python processes beside the UI's one.
UI_DEFAULTS = {**CLIENT_DEFAULTS, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# Each MLflow HTTP call of the driver gives up after about 20 s (MLflow's default is minutes of
# retries); `MlflowWriter` retries held updates itself. Values set in the environment win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}

# One quick attempt, for the check that a tracking server answers before a search starts.
HTTP_ONE_ATTEMPT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# While a search's Tuners run. Tune saves its experiment state every 10 s or more ("auto"), and after every
# second checkpoint of a trial when two are kept: a driver killed in between loses the trials started since,
# which a resume then proposes again. Every 2 s keeps that window short (about 25 KB a trial); a value the user
# set wins.
SEARCH_DEFAULTS = {"TUNE_GLOBAL_CHECKPOINT_S": "2"}
SEARCH_SETTINGS = {
    # Epochs between evaluations (`evaluation.eval_every`) report no objective; ASHA and Optuna act on the
    # evaluated ones only, and Tune must not refuse the others.
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # Tune then leaves SIGINT to `stopping.StopSignals` and listens for SIGUSR1 only
    # (ray.tune.tune._setup_signal_catching).
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
}


def set_defaults(values: Mapping[str, str]) -> None:
    """Set each variable the environment does not already set (for this process and every one it starts)."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def kept(*names: str) -> Iterator[None]:
    """Restore `names` to what they were on entry, whatever the block (or a library it calls) set."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def overridden(values: Mapping[str, str], defaults: Mapping[str, str] | None = None) -> Iterator[None]:
    """`values` set, and `defaults` where unset, for the block only."""
    with kept(*values, *(defaults or {})):
        os.environ.update(values)
        set_defaults(defaults or {})
        yield


def search_settings() -> contextlib.AbstractContextManager[None]:
    """What a search sets while it runs (`SEARCH_SETTINGS`, `SEARCH_DEFAULTS`), with the driver's bounded HTTP
    retries, which stay for the process (its trials start with them)."""
    set_defaults(HTTP_RETRY_DEFAULTS)
    return overridden(SEARCH_SETTINGS, SEARCH_DEFAULTS)


def append_warning_filter(text: str) -> None:
    """Add a `PYTHONWARNINGS` filter for this process and those it starts, after the user's."""
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), text]))
