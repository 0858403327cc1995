"""How a search stops early and cleanly: on Ctrl-C or SIGTERM (`StopSignals`), or when a trial meets a full
storage disk (`StopWhenStorageFull`); either way Tune saves its state with the trials unfinished, for `resume`."""

from __future__ import annotations

import contextlib
import os
import sys

from ray.tune import Callback

from ssl_tune.storage_path import StoragePath
from ssl_tune.trials.checkpoints import SpaceReserve
from ssl_tune.trials.runner import STORAGE_FULL_KEY


class StopWhenStorageFull(Callback):
    """A trial that cannot write its checkpoint to a full disk (`STORAGE_FULL_KEY`) stops the whole search
    the way Ctrl-C does (Tune's SIGUSR1): every trial would meet the same disk, and stopped trials stay
    unfinished, so `ssl-tune resume` goes on once there is room. Trials failed for it would not. The driver
    reads which trial met it from the results (`storage_full_message`); this callback, which Tune pickles with
    the Tuner and a resume unpickles, holds only the storage path whose reserve it releases."""

    # Class defaults: an instance an earlier version pickled (a search resumed after an upgrade) has neither;
    # it stops the search all the same, without releasing the reserve it cannot find.
    storage: StoragePath | None = None
    stopping = False

    def __init__(self, storage: StoragePath) -> None:
        self.storage = storage

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self.stopping = False  # (a resumed search's copy was pickled before or after a stop)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        import signal

        if result.get(STORAGE_FULL_KEY) and not self.stopping:
            self.stopping = True
            if self.storage is not None:
                SpaceReserve.release(self.storage)  # room for Tune's last save of its state, as it stops
            os.kill(os.getpid(), signal.SIGUSR1)


def storage_full_message(results, since: float) -> str | None:
    """What the first trial that met a full disk since `since` (a time.time()) said, from a stage's results;
    an earlier report (a search stopped for it, then resumed) is past."""
    said = [(r.metrics["timestamp"], str(r.metrics[STORAGE_FULL_KEY])) for r in results
            if r.metrics and r.metrics.get(STORAGE_FULL_KEY) and r.metrics.get("timestamp", 0) >= int(since)]
    return min(said)[1] if said else None


class StopSignals:
    """How a search ended, known rather than counted: the first SIGINT (Ctrl-C) or SIGTERM (a batch
    scheduler ending the job) is recorded here and passed to Tune as its own graceful stop (SIGUSR1):
    trials stop, the experiment state is saved with them unfinished, and `ssl-tune resume` continues
    them. Tune, told by SIGINT, would record them TERMINATED like trials that finished. A second
    signal stops at once (KeyboardInterrupt), as does one that arrives before Tune listens, unless
    `outside_tune`: between a stage's Tuners (the confirmation's rounds) the first is only recorded, and the
    driver stops before the next round."""

    def __init__(self, outside_tune: bool = False) -> None:
        self.received: str | None = None
        self.outside_tune = outside_tune

    def _handle(self, signum: int, frame) -> None:
        import signal

        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if not first or not (tune_listens or self.outside_tune):
            raise KeyboardInterrupt
        if not tune_listens:
            print(f"\n{self.received}: stopping before the next round (again to stop at once)", file=sys.__stdout__,
                  flush=True)
            return
        print(f"\n{self.received}: stopping the trials at their last checkpoint (again to stop at once)",
              file=sys.__stdout__, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    @contextlib.contextmanager
    def installed(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        # Tune leaves SIGINT to this handler and listens for SIGUSR1 (`process_env.SEARCH_SETTINGS`).
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        previous_usr1 = signal.getsignal(signal.SIGUSR1)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.signal(signal.SIGUSR1, previous_usr1)
