"""Run a function on W local ranks of a gloo process group: for global-batch equality checks (the tests)
and a bare DDP loop to compare the trainer with (`benchmarks/search_overhead.py`).

Every wait has a deadline: a rank that dies, or blocks in a collective, fails the caller with what the
other ranks said instead of hanging it.
"""

from __future__ import annotations

import os
import pickle
import queue as queues
import socket
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ranks fork from one server process per caller that has imported these already: a spawned rank imported
# torch and the trainer itself, about 3 s of CPU each, most of a two-rank test's time.
PRELOADED = ["torch", "torch.distributed", "trainers.loop"]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, timeout: float,
            environ: dict[str, str], cwd: str) -> None:
    import datetime

    # The caller's environment and directory now, not the fork server's when it started.
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(cwd)
    # A collective that waits longer than the caller's deadline raises here instead of blocking forever.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    try:
        # Plain pickle: tensors travel as bytes, not as shared-memory handles that die with this process.
        results.put((rank, pickle.dumps(fn(rank, *args)), None))
    except Exception as exc:  # report to the parent instead of hanging it
        import traceback

        results.put((rank, None, traceback.format_exc()))
        raise SystemExit(1) from exc
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """`fn(rank, *args)` on `world_size` CPU processes (forked from a server that has imported torch); returns
    their results by rank.

    `fn` must be importable (defined at module level); results must be picklable. Raises RuntimeError when a
    rank fails, dies without a result, or `timeout` seconds pass before every rank has answered.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOADED)  # (takes effect when the server starts: at this caller's first call)
    results_queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results_queue, timeout, dict(os.environ),
                                               os.getcwd()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    was_silent: list[int] = []
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, value, error = results_queue.get(timeout=1.0)
            except queues.Empty:
                silent = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results and r not in errors]
                if (silent and silent == was_silent) or time.monotonic() > deadline:  # (silent for a whole second)
                    why = (f"rank(s) {silent} exited (codes {[procs[r].exitcode for r in silent]}) without a result"
                           if silent else f"no answer from every rank within {timeout:g} s")
                    raise RuntimeError(f"{why}; answered: {sorted(results)}\n" + "\n".join(errors.values())) from None
                was_silent = silent
                continue
            if error:
                errors[rank] = f"rank {rank}:\n{error}"
            else:
                results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors.values()))
    return [results[r] for r in range(world_size)]
