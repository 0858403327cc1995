"""How a search stops early and cleanly: on Ctrl-C or SIGTERM (`StopSignals`), or when a trial meets a full
storage disk (`StopWhenStorageFull`); either way Tune saves its state with the trials unfinished, for `resume`."""

from __future__ import annotations

import contextlib
import os
import sys

from ray.tune import Callback

from ssl_tune import checkpoints
from ssl_tune.trial import STORAGE_FULL_KEY


class StopWhenStorageFull(Callback):
    """A trial that cannot write its checkpoint to a full disk (`STORAGE_FULL_KEY`) stops the whole search
    the way Ctrl-C does (Tune's SIGUSR1): every trial would meet the same disk, and stopped trials stay
    unfinished, so `ssl-tune resume` goes on once there is room. Trials failed for it would not."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        import signal

        if result.get(STORAGE_FULL_KEY) and not storage_full:
            storage_full.append(str(result[STORAGE_FULL_KEY]))
            space_reserve.release()  # room for Tune's last save of its state, as it stops
            os.kill(os.getpid(), signal.SIGUSR1)


storage_full: list[str] = []  # what the first trial that met a full disk said, in this process
space_reserve = checkpoints.SpaceReserve()  # held on the storage path's disk while a stage runs


class StopSignals:
    """How a search ended, known rather than counted: the first SIGINT (Ctrl-C) or SIGTERM (a batch
    scheduler ending the job) is recorded here and passed to Tune as its own graceful stop (SIGUSR1):
    trials stop, the experiment state is saved with them unfinished, and `ssl-tune resume` continues
    them. Tune, told by SIGINT, would record them TERMINATED like trials that finished. A second
    signal stops at once (KeyboardInterrupt), as does one that arrives before Tune listens."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame) -> None:
        import signal

        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if not first or not tune_listens:
            raise KeyboardInterrupt
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
        # Tune then leaves SIGINT to us and listens for SIGUSR1 only (ray.tune.tune._setup_signal_catching).
        saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        previous_usr1 = signal.getsignal(signal.SIGUSR1)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.signal(signal.SIGUSR1, previous_usr1)
            if saved_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env
