"""What `ssl-tune run` prints: a compact table of trial events instead of Ray's own output, which
goes to a log file (`--verbose` restores it)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ssl_tune.spec import SpecBase


@contextlib.contextmanager
def ray_output_to(log_path: Path):
    """Send Ray's Python logging, warnings and stray prints of the driver to `log_path`.

    Our own console output goes to `sys.__stdout__`, which this leaves alone. Worker output is
    not forwarded to the driver at all (`ray.init(log_to_driver=False)`); Ray keeps it in its
    session logs.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        handlers = [h for name in ["ray", *logging.root.manager.loggerDict]
                    if name == "ray" or name.startswith("ray.")
                    for h in getattr(logging.getLogger(name), "handlers", [])
                    if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        saved = [(h, h.setStream(log)) for h in handlers]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            for handler, stream in saved:
                handler.setStream(stream)


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

    The ETA is an upper bound: the epochs still to run if no further trial were stopped early,
    at the pace measured so far.
    """

    def __init__(self, spec: SpecBase) -> None:
        self.metric, self.mode = spec.search.metric, spec.search.mode
        self.params = spec.searchable_paths()
        self.epochs, self.num_samples = spec.training.epochs, spec.search.num_samples
        self._reset()

    def _reset(self) -> None:
        self.start = time.time()
        self.epochs_run = 0  # epochs trained in this driver
        self.epochs_settled: dict[str, int] = {}  # trial -> epochs it will not need (done or skipped)
        self.best = math.nan
        self.header_printed = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(epochs_settled={}, best=math.nan, header_printed=False, epochs_run=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.start = time.time()  # a resumed search measures its own pace

    def _print(self, text: str) -> None:
        print(text, file=sys.__stdout__, flush=True)

    def _row(self, trial, status: str, epoch: int | str, value: float | None) -> None:
        columns = ["trial", "status", *self.params, "epoch", self.metric, "best", "ETA max"]
        widths = [10, 9, *[max(10, len(p)) for p in self.params], 6, max(9, len(self.metric)), 8, 7]
        if not self.header_printed:
            self._print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
            self.header_printed = True
        config = getattr(trial, "config", {}) or {}
        params = [_fmt(next((v for k, v in config.items() if k.split("|")[0] == p), "-")) for p in self.params]
        cells = [trial.trial_id[-10:], status, *params, f"{epoch}/{self.epochs}", _fmt(value) if value is not None else "-",
                 _fmt(self.best), self._eta()]
        self._print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))

    def _eta(self) -> str:
        if not self.epochs_run:
            return "-"
        pace = (time.time() - self.start) / self.epochs_run
        remaining = self.num_samples * self.epochs - sum(self.epochs_settled.values())
        return _duration(max(0, remaining) * pace)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._row(trial, "started", 0, None)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from ssl_tune.tracking import DIVERGED_KEY

        if DIVERGED_KEY in result:
            return
        epoch, value = int(result.get("epoch", 0)), result.get(self.metric)
        self.epochs_run += 1
        self.epochs_settled[trial.trial_id] = epoch
        if value is not None and math.isfinite(value):
            if math.isnan(self.best) or (value > self.best if self.mode == "max" else value < self.best):
                self.best = value
        self._row(trial, "running", epoch, value)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        from ssl_tune.tracking import DIVERGED_KEY

        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        self.epochs_settled[trial.trial_id] = self.epochs  # stopped early: its other epochs never run
        status = "diverged" if DIVERGED_KEY in last else ("finished" if epoch >= self.epochs else "stopped")
        self._row(trial, status, epoch, last.get(self.metric))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.epochs_settled[trial.trial_id] = self.epochs
        self._row(trial, "failed", int((trial.last_result or {}).get("epoch", 0)), None)
