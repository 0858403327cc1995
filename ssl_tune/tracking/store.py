"""The tracking store: its URI, a client, the checks before a search, and batched writes."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ssl_tune import process_env
from ssl_tune.spec import SpecError
from ssl_tune.storage_path import is_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str | None = None) -> str:
    """The given URI, else MLFLOW_TRACKING_URI, else ./mlflow.db; sqlite paths made absolute (Ray workers chdir)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def client_for(uri: str):
    process_env.set_defaults(process_env.CLIENT_DEFAULTS)
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not path.exists() and path.parent.is_dir():
            _create_sqlite_store(path, MlflowClient)
    return MlflowClient(tracking_uri=uri)


def _create_sqlite_store(path: Path, client_class) -> None:
    """Create a missing sqlite store whole. MLflow builds its tables in place over a second or two, and a second
    process opening the file meanwhile (a search starting beside `ssl-tune results`, a test's poll, two searches in
    one directory) builds them again: one of the two fails with "table ... already exists". The tables are built in
    a private file and hard-linked into place, so an opener finds no store or a complete one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    scratch = path.with_name(f".{path.name}.{os.getpid()}.creating")
    scratch_uri = f"sqlite:///{scratch}"
    try:
        client_class(tracking_uri=scratch_uri).search_experiments(max_results=1)  # tables and the Default experiment
        engine = SqlAlchemyStore._engine_map.pop(scratch_uri, None)  # MLflow caches one engine per URI
        if engine is not None:
            engine.dispose()
        try:
            os.link(scratch, path)
        except FileExistsError:  # another process's store got there first: that one stays
            return
        except OSError:  # a file system without hard links: moved into place unless a store appeared meanwhile
            if not path.exists():
                os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `models:/` URIs) at `uri` for this block only. `mlflow.set_tracking_uri`
    also sets $MLFLOW_TRACKING_URI, which a notebook's later runs, and every process it starts, would inherit."""
    import mlflow

    before = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    with process_env.kept("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None unsets it, as it was


def existing_store_client(uri: str):
    """A client for a tracking store that must already exist (read-only commands: results, list,
    export). MLflow would create an empty store for a missing sqlite file or local directory, and then
    report "no experiment"; this raises LookupError naming the store instead."""
    if uri.startswith("sqlite:///"):
        local = uri.removeprefix("sqlite:///")
    elif uri.startswith("file:") or (not is_uri(uri) and not uri.startswith("databricks")):
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
    try:
        with process_env.overridden(process_env.HTTP_ONE_ATTEMPT):
            client_for(uri).search_experiments(max_results=1)
    except Exception as exc:  # connection refused, DNS, HTTP errors: all mean "cannot log here"
        # The server's answer by its status, which MLflow's exception carries as an error code.
        status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
        if status in (401, 403):
            who = ("as " + os.environ["MLFLOW_TRACKING_USERNAME"]) if os.environ.get("MLFLOW_TRACKING_USERNAME") else \
                "without credentials"
            raise SpecError(f"mlflow.tracking_uri: the MLflow tracking server at {uri} refused this client {who} "
                            f"(HTTP {'401: not authenticated' if status == 401 else '403: no permission'}); "
                            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to "
                            "an account of that server") from None
        raise SpecError(f"mlflow.tracking_uri: cannot reach the MLflow tracking server at {uri} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                        "start it (mlflow server --host ...) or point mlflow.tracking_uri / "
                        "MLFLOW_TRACKING_URI at a running one") from None


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
