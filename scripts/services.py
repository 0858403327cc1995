#!/usr/bin/env python3
"""Start and stop the services a team runs beside ssl-tune, on loopback, for tests and for trying
things out: today an `mlflow server` over a sqlite store and a local artifact directory.

    python scripts/services.py mlflow start --dir /tmp/mlflow-srv [--port 5001]   # prints JSON: pid, url
    python scripts/services.py mlflow stop --dir /tmp/mlflow-srv [--kill]         # SIGTERM (or SIGKILL) by PID

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


def start_mlflow(directory: Path, port: int | None = None, timeout: float = 90.0) -> dict:
    """Start `mlflow server` on 127.0.0.1 with its store in `directory`; wait until it answers."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               # artifacts through the server (mlflow-artifacts:/): clients on other machines read and write them
               "--serve-artifacts", "--artifacts-destination", str(directory / "artifacts")]
    log = open(directory / "mlflow.log", "a")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
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
                    return {"pid": proc.pid, "url": url, "port": port, "log": str(directory / "mlflow.log")}
        except OSError:
            time.sleep(0.3)
    stop(directory, "mlflow", kill=True)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:g} s; see {directory / 'mlflow.log'}")


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
    parser.add_argument("service", choices=["mlflow"])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="where the service keeps its data, PID and log")
    parser.add_argument("--port", type=int, help="start: the port (default: a free one)")
    parser.add_argument("--kill", action="store_true", help="stop: SIGKILL instead of SIGTERM, like a crash")
    args = parser.parse_args(argv)
    if args.action == "start":
        print(json.dumps(start_mlflow(args.dir, args.port)), flush=True)
    else:
        print("stopped" if stop(args.dir, args.service, kill=args.kill) else "not running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
