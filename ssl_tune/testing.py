"""Run a function on W local ranks of a gloo process group: for global-batch equality checks."""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Plain pickle: tensors travel as bytes, not as shared-memory handles that die with this process.
        queue.put((rank, pickle.dumps(fn(rank, *args)), None))
    except Exception as exc:  # report to the parent instead of hanging it
        import traceback

        queue.put((rank, None, traceback.format_exc()))
        raise SystemExit(1) from exc
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """`fn(rank, *args)` on `world_size` spawned CPU processes; returns their results by rank.

    `fn` must be importable (defined at module level); results must be picklable.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    for _ in range(world_size):
        rank, value, error = queue.get()
        results[rank] = None if value is None else pickle.loads(value)
        if error:
            errors.append(f"rank {rank}:\n{error}")
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
