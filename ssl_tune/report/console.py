"""What `ssl-tune run` prints: a compact table of trial events instead of Ray's own output, which
goes to a log file (`--verbose` restores it)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from ray.tune import Callback

from ssl_tune.searching import budget
from ssl_tune.searching.space import best_value, field_values
from ssl_tune.spec import SpecBase
from ssl_tune.trials.runner import DAMAGED_CHECKPOINT_KEY, FAILURE_KEY, STORAGE_FULL_KEY, error_summary


@contextlib.contextmanager
def ray_output_to(log_path: Path):
    """Send Ray's Python logging, warnings and stray prints of the driver to `log_path`.

    Our own console output goes to `sys.__stdout__`, which this leaves alone. Worker output is
    not forwarded to the driver at all (`ray.init(log_to_driver=False)`); Ray keeps it in its
    session logs.
    """
    with _LogFile(log_path) as log:
        handlers = {h: None for name in ["ray", *logging.root.manager.loggerDict]
                    if name == "ray" or name.startswith("ray.")
                    for h in getattr(logging.getLogger(name), "handlers", [])
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)}
        # Each handler once, its own stream kept: setStream returns None for a stream already set.
        saved = [(h, h.stream) for h in handlers]
        for handler, _ in saved:
            handler.setStream(log)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            for handler, stream in saved:
                handler.setStream(stream)


class _LogFile:
    """The driver's log file, which never fails the search: it often lies on the storage path's disk,
    and when that fills (or cannot be opened) the log says so once on stderr and drops what follows."""

    def __init__(self, path: Path) -> None:
        self.path, self.file = path, None
        self.devnull: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)
        except OSError as exc:
            self._lost(exc)

    def _lost(self, exc: OSError) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        self.file = None
        print(f"warning: Ray's output cannot be written to {self.path} ({exc.strerror or exc}); it is dropped from "
              "here on", file=sys.__stderr__, flush=True)

    def write(self, text: str) -> int:
        if self.file is not None:
            try:
                self.file.write(text)
            except OSError as exc:
                self._lost(exc)
        return len(text)

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as exc:
                self._lost(exc)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # Ray's faulthandler writes to the descriptor of the (redirected) stderr
        if self.file is None:
            self.devnull = self.devnull or open(os.devnull, "w")
            return self.devnull.fileno()
        return self.file.fileno()

    def __enter__(self) -> _LogFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in (self.file, self.devnull):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ConsoleTable(Callback):
    """One row per trial event: trial, status, sampled params, epoch, objective, best so far, ETA.

    "best" is the best trial's objective so far by the one definition (`ssl_tune.searching.space`): each
    trial counts with the value of its last evaluated epoch, as the leaderboard and Optuna see it.

    The ETA is the time left for the whole command: the epochs the stage's trials are expected to
    run still (under ASHA, `ssl_tune.searching.budget`: each rung's measured promotion rate) plus the epochs of
    the stages after it (`epochs_after`: the confirmation stage, in epochs of this stage's setting), at
    the measured time between two epochs of one trial, divided over the most trials seen running at once
    (not the current count, which dips between one trial's end and the next one's start). There is none
    ("-") until an epoch's duration has been measured: start-ups and restarts are not epochs.
    """

    def __init__(self, spec: SpecBase, num_samples: int | None = None, *, early_stopping: bool = True,
                 epochs_after: float = 0) -> None:
        self.spec = spec
        self.metric, self.mode = spec.search.metric, spec.search.mode
        self.params = spec.searchable_paths()
        self.epochs, self.num_samples = spec.training.epochs, num_samples or spec.search.num_samples
        self.early_stopping, self.epochs_after = early_stopping, epochs_after
        self._reset()

    def _reset(self) -> None:
        self.reached: dict[str, int] = {}  # trial -> its last reported epoch
        self.ended: set[str] = set()  # trials that no longer run (finished, stopped or failed)
        self.failed: set[str] = set()
        self.latest: dict[str, float] = {}  # trial -> its objective so far (the value of its last evaluated epoch)
        self.header_printed = False
        self.last_result_at: dict[str, float] = {}  # running trial -> when it last reported an epoch
        self.epoch_seconds: list[float] = []  # measured durations of single epochs
        self.concurrency = 1  # the most trials seen running at once

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("reached", "ended", "failed", "latest", "header_printed", "last_result_at", "epoch_seconds", "concurrency"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()  # a resumed search measures its own pace

    def _print(self, text: str) -> None:
        print(text, file=sys.__stdout__, flush=True)

    def _row(self, trial, status: str, epoch: int | str, value: float | None) -> None:
        columns = ["trial", "status", *self.params, "epoch", self.metric, "best", "ETA"]
        widths = [10, 9, *[max(10, len(p)) for p in self.params], 6, max(9, len(self.metric)), 8, 7]
        if not self.header_printed:
            self._print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
            self.header_printed = True
        values = field_values(getattr(trial, "config", {}) or {})
        params = [_fmt(values.get(p, "-")) for p in self.params]
        cells = [trial.trial_id[-10:], status, *params, f"{epoch}/{self.epochs}", _fmt(value) if value is not None else "-",
                 _fmt(self.best), self._eta()]
        self._print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))

    @property
    def best(self) -> float:
        """The best trial's objective so far, as the leaderboard will rank it (`ssl_tune.searching.space`)."""
        best = best_value(self.latest.values(), self.mode)
        return math.nan if best is None else best

    def _eta(self) -> str:
        if not self.epoch_seconds:
            return "-"
        epoch_s = sum(self.epoch_seconds[-50:]) / len(self.epoch_seconds[-50:])
        return _duration(self.epochs_left() * epoch_s / self.concurrency)

    def epochs_left(self) -> float:
        """Epochs the command is expected to train still: this stage's trials (running and not yet
        started) and the stages after it."""
        if self.early_stopping:
            counted = {t: e for t, e in self.reached.items() if t not in self.failed}
            rates = budget.promotion_rates(self.spec, counted, self.ended)
            left = lambda done: budget.expected_epochs_left(self.spec, done, rates)  # noqa: E731
        else:
            left = lambda done: float(max(0, self.epochs - done))  # noqa: E731
        running = sum(left(epoch) for trial, epoch in self.reached.items() if trial not in self.ended)
        pending = max(0, self.num_samples - len(self.reached)) * left(0)
        return running + pending + self.epochs_after

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.last_result_at[trial.trial_id] = math.nan  # running, no epoch measured yet
        self.reached.setdefault(trial.trial_id, int((trial.last_result or {}).get("epoch", 0)))
        self.concurrency = max(self.concurrency, len(self.last_result_at))
        self._row(trial, "started", int((trial.last_result or {}).get("epoch", 0)), None)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.last_result_at[trial.trial_id] = math.nan  # the restart is not an epoch
        self._row(trial, "restart", int((trial.last_result or {}).get("epoch", 0)), None)
        self._print(f"  trial {trial.trial_id} restarts from its latest checkpoint after: {error_summary(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if FAILURE_KEY in result:
            return
        if STORAGE_FULL_KEY in result:
            self._print(f"  trial {trial.trial_id}: {str(result[STORAGE_FULL_KEY])[:300]}; stopping the search")
            return
        if result.get(DAMAGED_CHECKPOINT_KEY):
            self._print(f"  trial {trial.trial_id} skipped a damaged checkpoint: {str(result[DAMAGED_CHECKPOINT_KEY])[:300]}")
        epoch, value, now = int(result.get("epoch", 0)), result.get(self.metric), time.monotonic()
        previous = self.last_result_at.get(trial.trial_id, math.nan)
        if math.isfinite(previous):
            self.epoch_seconds.append(now - previous)
        self.last_result_at[trial.trial_id] = now
        self.reached[trial.trial_id] = epoch
        if value is not None:  # an epoch without evaluation keeps the last evaluated value
            self.latest[trial.trial_id] = value
        self._row(trial, "running", epoch, value)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        self.last_result_at.pop(trial.trial_id, None)
        self.reached[trial.trial_id] = epoch
        self.ended.add(trial.trial_id)
        if FAILURE_KEY in last:
            self.failed.add(trial.trial_id)
            self.latest.pop(trial.trial_id, None)  # a failed trial's last value is not a result
            reason = str(last[FAILURE_KEY])
            self._row(trial, "diverged" if reason.startswith("diverged") else "failed", epoch, None)
            self._print(f"  trial {trial.trial_id} failed: {reason[:300]}")
            return
        self._row(trial, "finished" if epoch >= self.epochs else "stopped", epoch, last.get(self.metric))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.last_result_at.pop(trial.trial_id, None)
        self.latest.pop(trial.trial_id, None)
        self.reached.setdefault(trial.trial_id, 0)
        self.ended.add(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._row(trial, "failed", int((trial.last_result or {}).get("epoch", 0)), None)
        self._print(f"  trial {trial.trial_id} failed: {error_summary(trial)}")
