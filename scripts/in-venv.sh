#!/usr/bin/env bash
# Run a command inside the project's virtualenv (.venv), creating it and installing the
# pinned dependencies (requirements.lock) and ssl-tune itself first when needed.
#   bash scripts/in-venv.sh ssl-tune train search_spaces/twist.yaml
#   bash scripts/in-venv.sh python -m pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SSL_TUNE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[in-venv] creating $venv with $($python --version)" >&2
  "$python" -m venv "$venv"
fi
# Reinstall only when the lock file or the project metadata changed since the last install.
stamp="$venv/.ssl-tune-installed"
want="$(cat "$root/requirements.lock" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[in-venv] installing pinned dependencies (first time: a few minutes)" >&2
  # (grep drops pip's warnings about index directories some machines configure but lack)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/requirements.lock" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$root" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$want" > "$stamp"
fi
export MLFLOW_DISABLE_TELEMETRY=true
# The commands ssl-tune prints for the user (ui, export, resume) call it the way this script was
# called, from the user's directory; exec keeps this process id, so only that process uses them.
export SSL_TUNE_LAUNCHER="bash $(printf %q "$0")" SSL_TUNE_LAUNCHER_PID=$$
cd "$root"
exec "$venv/bin/$1" "${@:2}"
