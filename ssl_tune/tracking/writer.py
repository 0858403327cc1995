"""Writes a search's MLflow updates on a background thread, in order, riding out a tracking outage."""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# How long the end of a search waits for a tracking server that does not answer before giving up on the
# updates it holds (seconds; $SSL_TUNE_TRACKING_WAIT_S changes it). While the server answers, it waits on.
FINAL_FLUSH_S = 120.0


def final_flush_s() -> float:
    return float(os.environ.get("SSL_TUNE_TRACKING_WAIT_S") or FINAL_FLUSH_S)
# Updates this process gave up on at the end of a stage (the server stayed away): the stage's record is
# then incomplete, and `ssl-tune resume` completes it from Tune's files (`ssl_tune.searching.replay`).
_given_up: list[int] = [0]


def updates_given_up(reset: bool = False) -> int:
    count = _given_up[0]
    if reset:
        _given_up[0] = 0
    return count


class MlflowWriter:
    """Writes MLflow updates in order on a background thread, so that a slow or dead tracking
    server never blocks the Tune loop (and with it every trial).

    An update that fails is retried (every `retry_s`) until it succeeds; the updates after it wait,
    so the order is kept and nothing is written twice. The console says once when the server
    becomes unreachable and once when it is back. A best-effort update (figures) that fails while
    the server answers is dropped with a warning instead of holding the queue.
    """

    def __init__(self, uri: str, client_factory: Callable[[], Any], retry_s: float = 2.0) -> None:
        import threading

        self.uri, self.retry_s, self._client_factory = uri, retry_s, client_factory
        self._client = None
        self._queue: collections.deque[tuple[Callable[[], None], str | None]] = collections.deque()
        self._wake = threading.Condition()
        self._busy = False
        self._down_since: float | None = None  # since when updates fail (None: the last one was written)
        self._last_written = 0.0  # time.monotonic() of the last update written
        self._thread = threading.Thread(target=self._run, name="ssl-tune-mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def submit(self, update: Callable[[], None], best_effort: str | None = None) -> None:
        """Queue `update` (never blocks). `best_effort` names it if it may be dropped on an error."""
        with self._wake:
            self._queue.append((update, best_effort))
            self._wake.notify()

    @property
    def pending(self) -> int:
        with self._wake:
            return len(self._queue) + self._busy

    def drain(self, timeout: float) -> bool:
        """Wait until every queued update is written; False once updates have failed and none was written for
        `timeout` s (the server stays away). While the server answers, it waits however long the queue takes:
        a replay of many epochs against a server just back must not give up half-way."""
        start = time.monotonic()
        with self._wake:
            while self._queue or self._busy:
                unanswered = time.monotonic() - max(start, self._last_written)
                if self._down_since is not None and unanswered >= timeout:
                    return False
                self._wake.wait(0.5)
        return True

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                update, best_effort = self._queue[0]
                self._busy = True
            error = None
            try:
                update()
            except Exception as exc:  # the store is down, or refuses the call
                error = exc
            # A best-effort update that fails while the server answers is its own fault: drop it.
            done = error is None or (best_effort is not None and self._reachable())
            with self._wake:
                self._busy = False
                if done:
                    self._queue.popleft()
                if error is None:
                    self._last_written = time.monotonic()
                self._wake.notify_all()
            if error is None:
                self._back()
            elif done:
                print(f"warning: {best_effort} not logged ({type(error).__name__}: {error})", file=sys.__stderr__)
            else:
                self._down(error)
                time.sleep(self.retry_s)

    def _reachable(self) -> bool:
        try:
            self.client.search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _down(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            first = str(error).splitlines()[0][:200] if str(error) else ""
            print(f"warning: MLflow at {self.uri} is unreachable ({type(error).__name__}: {first}); training goes on, "
                  f"updates are held in order and retried every {self.retry_s:g} s, and Tune's result files keep every "
                  "metric", file=sys.__stderr__, flush=True)

    def _back(self) -> None:
        if self._down_since is not None:
            print(f"MLflow at {self.uri} is reachable again after {time.monotonic() - self._down_since:.0f} s; "
                  "held updates are being written", file=sys.__stderr__, flush=True)
            self._down_since = None
