#!/usr/bin/env python3
"""Start and stop the services a team runs beside ssl-tune, on loopback, for tests and for trying
things out: PostgreSQL (MLflow's backend store), an S3-compatible endpoint (moto's server: artifacts
and Ray storage) and `mlflow server` over them (or over sqlite and a local directory).

    python scripts/services.py postgres start --dir /tmp/svc/pg                   # prints JSON: pid, uri
    python scripts/services.py s3 start --dir /tmp/svc/s3 [--bucket ssl-tune]    # prints JSON: pid, endpoint, bucket
    python scripts/services.py mlflow start --dir /tmp/svc/mlflow [--port 5001] \
        [--backend-store-uri postgresql://...] [--artifacts-destination s3://BUCKET/mlflow --s3-endpoint URL]
    python scripts/services.py NAME stop --dir DIR [--kill]                        # SIGTERM (or SIGKILL) by PID

PostgreSQL comes from Debian's package (`apt-get install postgresql`); as root it runs as `nobody`,
since it refuses root. moto's S3 keeps its objects in memory: they last as long as its process.
Clients reach S3 through the usual settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...;
`MLFLOW_S3_ENDPOINT_URL` for MLflow); `mlflow server` serves artifacts itself, so clients need none.

Each service runs in its own process session, its PID in DIR/NAME.pid and its output in DIR/NAME.log,
so it is stopped by PID (never by name: other users' servers on the machine are left alone). Starting
again with the same DIR and port brings the same store back, as after a server restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# The basic-auth app's administrator (`mlflow start --auth`), for tests on loopback only.
AUTH_ADMIN = ("admin", "ssl-tune-admin-password")
# Credentials of the loopback S3 endpoint (moto accepts any).
S3_ENV = {"AWS_ACCESS_KEY_ID": "ssl-tune", "AWS_SECRET_ACCESS_KEY": "ssl-tune-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def start_mlflow(directory: Path, port: int | None = None, timeout: float = 90.0, backend_store_uri: str | None = None,
                 artifacts_destination: str | None = None, s3_endpoint: str | None = None, auth: bool = False) -> dict:
    """Start `mlflow server` on 127.0.0.1 (by default with a sqlite store and artifacts in `directory`);
    wait until it answers. `auth`: MLflow's basic-auth app, its users in `directory/auth.db`, with
    MLflow's default admin (clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_store_uri or f"sqlite:///{directory / 'mlflow.db'}",
               # artifacts through the server (mlflow-artifacts:/): clients on other machines read and write them
               "--serve-artifacts", "--artifacts-destination", artifacts_destination or str(directory / "artifacts")]
    log = open(directory / "mlflow.log", "a")
    # Without MLflow 3's job runner: 8 more Python processes (a consumer per GenAI job queue) that a tracking
    # server for training runs never uses, started again at every restart.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if auth:
        config = directory / "basic_auth.ini"
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = sqlite:///{directory / 'auth.db'}\n"
                          f"admin_username = {AUTH_ADMIN[0]}\nadmin_password = {AUTH_ADMIN[1]}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        command += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", os.urandom(16).hex())  # CSRF key of this one server
    if s3_endpoint:
        env.update(S3_ENV, MLFLOW_S3_ENDPOINT_URL=s3_endpoint)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    _pid_file(directory, "mlflow").write_text(str(proc.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}); see {directory / 'mlflow.log'}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return {"pid": proc.pid, "url": url, "port": port, "log": str(directory / "mlflow.log"),
                            **({"username": AUTH_ADMIN[0], "password": AUTH_ADMIN[1]} if auth else {})}
        except OSError:
            time.sleep(0.3)
    stop(directory, "mlflow", kill=True)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:g} s; see {directory / 'mlflow.log'}")


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float,
                   host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:g} s; see {log}")


def start_postgres(directory: Path, port: int | None = None, timeout: float = 60.0) -> dict:
    """Start PostgreSQL on 127.0.0.1 with a database `mlflow` (trust authentication, loopback only).

    Its data directory is recorded in `directory/postgres.json`, so starting again with the same
    `directory` brings the same data back. As root, the server runs as `nobody` with its data in a
    directory of its own under /tmp (test directories are often closed to other users).
    """
    import shutil

    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    bin_dir = Path(initdb).resolve().parent
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state_file = directory / "postgres.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    as_nobody = os.geteuid() == 0
    ids: dict[str, Any] = {"user": 65534, "group": 65534} if as_nobody else {}  # subprocess's user= and group=
    if "data" not in state:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="ssl-tune-pg-")) if as_nobody else directory
        data = base / "pgdata"
        if as_nobody:
            os.chown(base, 65534, 65534)
        subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, **ids)
        state = {"data": str(data)}
    port = port or state.get("port") or free_port()
    state["port"] = port
    state_file.write_text(json.dumps(state))
    log = directory / "postgres.log"
    data = Path(state["data"])
    proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                             "-k", str(data)], stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                            **ids)
    _pid_file(directory, "postgres").write_text(str(proc.pid))
    _wait_for_port(port, proc, "postgres", log, timeout)
    import psycopg2

    for _ in range(50):  # listening comes a moment before accepting logins
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
            break
        except psycopg2.OperationalError:
            time.sleep(0.2)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
        if cursor.fetchone() is None:
            cursor.execute("CREATE DATABASE mlflow")
    connection.close()
    return {"pid": proc.pid, "uri": f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", "port": port, "log": str(log)}


def start_s3(directory: Path, port: int | None = None, bucket: str = "ssl-tune", timeout: float = 60.0,
             host: str = "127.0.0.1") -> dict:
    """Start moto's S3-compatible server on `host` (loopback by default) and create `bucket`."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = directory / "s3.log"
    moto = str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([moto, "-H", host, "-p", str(port)], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _pid_file(directory, "s3").write_text(str(proc.pid))
    _wait_for_port(port, proc, "moto_server", log, timeout, host)
    import boto3

    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=bucket)
    return {"pid": proc.pid, "endpoint": endpoint, "bucket": bucket, "port": port, "log": str(log), "env": S3_ENV}


def stop(directory: Path, name: str, kill: bool = False, timeout: float = 30.0) -> bool:
    """Stop the service started in `directory` (its whole process group); False if it was not running."""
    pid_file = _pid_file(directory.resolve(), name)
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    if not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)  # the server and the workers it forked
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # not our child: its own parent reaps it
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=["mlflow", "postgres", "s3"])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="where the service keeps its data, PID and log")
    parser.add_argument("--port", type=int, help="start: the port (default: a free one)")
    parser.add_argument("--kill", action="store_true", help="stop: SIGKILL instead of SIGTERM, like a crash")
    parser.add_argument("--backend-store-uri", help="mlflow: e.g. the postgresql:// URI `postgres start` printed")
    parser.add_argument("--artifacts-destination", help="mlflow: e.g. s3://BUCKET/mlflow (with --s3-endpoint)")
    parser.add_argument("--s3-endpoint", help="mlflow: the S3 endpoint `s3 start` printed")
    parser.add_argument("--auth", action="store_true", help="mlflow: MLflow's basic-auth app (user and password)")
    parser.add_argument("--bucket", default="ssl-tune", help="s3: the bucket to create")
    parser.add_argument("--host", default="127.0.0.1", help="s3: the address to listen on (e.g. in a network namespace)")
    parser.add_argument("--purge", action="store_true", help="postgres stop: also delete its data directory")
    args = parser.parse_args(argv)
    if args.action == "start" and args.service == "postgres":
        print(json.dumps(start_postgres(args.dir, args.port)), flush=True)
    elif args.action == "start" and args.service == "s3":
        print(json.dumps(start_s3(args.dir, args.port, args.bucket, host=args.host)), flush=True)
    elif args.action == "start":
        print(json.dumps(start_mlflow(args.dir, args.port, backend_store_uri=args.backend_store_uri,
                                      artifacts_destination=args.artifacts_destination, s3_endpoint=args.s3_endpoint,
                                      auth=args.auth)),
              flush=True)
    else:
        print("stopped" if stop(args.dir, args.service, kill=args.kill) else "not running")
        state = args.dir / "postgres.json"
        if args.service == "postgres" and args.purge and state.exists():
            import shutil

            data = Path(json.loads(state.read_text())["data"])
            shutil.rmtree(data.parent if data.parent.name.startswith("ssl-tune-pg-") else data, ignore_errors=True)
            state.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
