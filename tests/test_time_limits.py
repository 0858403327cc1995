"""Every test has a time limit (pytest-timeout): a test that hangs fails on it, with its stack, instead of
holding the suite until CI's own limit ends the whole run."""

import subprocess
import sys

from tests.conftest import QUICK_TEST_TIMEOUT_S, ROOT

HANGS = '''
import threading


def test_waits_for_an_event_nobody_sets():
    threading.Event().wait()  # like a rank blocked in a collective, or queue.get() with no timeout
'''


def test_a_hung_test_fails_on_its_time_limit_with_its_stack(tmp_path, request):
    (tmp_path / "test_hangs.py").write_text(HANGS)
    # The suite's own settings (pyproject.toml), with the limit cut to 2 s for this demonstration.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", f"{ROOT}/pyproject.toml", "--rootdir", str(tmp_path),
                           "-p", "no:cacheprovider", "-o", "timeout=2", "-n", "0", str(tmp_path / "test_hangs.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Failed: Timeout (>2.0s)" in out and "1 failed" in out, out[-3000:]
    assert "threading.Event().wait()" in out  # the stack shows where it hung
    # In this suite: the quick tests' limit from conftest, the slow tests' from pyproject.toml.
    assert request.node.get_closest_marker("timeout").args == (QUICK_TEST_TIMEOUT_S,)
    assert request.config.getini("timeout") == "600"
