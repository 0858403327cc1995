"""Commands printed for the user to paste: `ssl-tune ...` as this shell can run it.

After the README's set-up `ssl-tune` is not on PATH (only `.venv/bin/ssl-tune` is), so a hint that
says `ssl-tune ui` would not run as printed. `scripts/in-venv.sh` tells the process it starts how it
was called (`SSL_TUNE_LAUNCHER`, for its own process id only, which `exec` keeps); otherwise the
command is the script this process runs from, by the path it was called with, or plain `ssl-tune`
when that is what PATH finds.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

LAUNCHER_ENV = "SSL_TUNE_LAUNCHER"  # e.g. "bash scripts/in-venv.sh"
LAUNCHER_PID_ENV = "SSL_TUNE_LAUNCHER_PID"  # the process the launcher started (not its children)


def ssl_tune_command(*args: str) -> str:
    """`ssl-tune ARGS`, as the user can paste it into the shell that started this process."""
    return " ".join([_program(), *(shlex.quote(str(a)) for a in args)])


def _program() -> str:
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):
        return f"{launcher} ssl-tune"
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.name != "ssl-tune":  # python -m ssl_tune.cli, or embedded
        return f"{shlex.quote(sys.executable)} -m ssl_tune.cli"
    on_path = shutil.which("ssl-tune")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "ssl-tune"
    return shlex.quote(str(script))
