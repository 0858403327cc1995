"""Connecting to Ray, and the checks before any trial starts: does the data load, does a trial fit
on the cluster's nodes, can every node write where trials write, does the address answer.

A failed check is the user's to fix: it raises `SpecError` (exit 2) naming the field or flag.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from typing import Any

from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.storage_path import StoragePath
from ssl_tune.storage_checks import check_object_storage

# The Tune trial that drives a multi-worker Train run needs a little CPU of its own (0 is refused).
TRAIN_DRIVER_CPU = 0.01


def tune_trial_resources(spec: SpecBase) -> dict[str, float]:
    """What the Tune trial itself reserves: the whole work for one worker, else only the Train driver
    (Ray Train's workers reserve their own resources)."""
    r = spec.resources
    if r.gpus_per_worker == "auto":  # (`resolve_gpus` sets it before any trial)
        raise ValueError("resources.gpus_per_worker is still 'auto'")
    if r.num_workers == 1:
        return {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    return {"CPU": TRAIN_DRIVER_CPU, "GPU": 0.0}


def node_resources() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster: id, address, CPU and GPU."""
    import ray

    return [{"id": n["NodeID"], "address": n["NodeManagerAddress"], "CPU": float(n["Resources"].get("CPU", 0)),
             "GPU": float(n["Resources"].get("GPU", 0))} for n in ray.nodes() if n["Alive"]]


def local_nodes() -> list[dict[str, Any]]:
    """This machine as the local Ray instance that `init_ray` starts without an address would see it."""
    import torch

    return [{"id": "local", "address": "this machine", "CPU": float(os.cpu_count() or 1),
             "GPU": float(torch.cuda.device_count())}]


def gpus_per_worker(spec: SpecBase, nodes: list[dict[str, Any]]) -> float:
    """`resources.gpus_per_worker` on these nodes: auto is 1 where any node has a GPU, else 0. Ray hides
    GPUs from a worker that reserves none, so on a GPU cluster 0 would train on the CPU."""
    g = spec.resources.gpus_per_worker
    if g != "auto":
        return float(g)
    return 1.0 if any(n["GPU"] for n in nodes) else 0.0


def resolve_gpus(spec: SpecBase, nodes: list[dict[str, Any]]) -> str:
    """Settle `resources.gpus_per_worker: auto` in place for the nodes trials run on (`gpus_per_worker`).
    Returns what it chose, and why, for the console ("" if it was not auto)."""
    r = spec.resources
    if r.gpus_per_worker != "auto":
        return ""
    r.gpus_per_worker = gpus_per_worker(spec, nodes)
    gpus = sum(n["GPU"] for n in nodes)
    return (f"resources.gpus_per_worker: auto -> {r.gpus_per_worker:g} "
            f"({f'the nodes have {gpus:g} GPU(s)' if gpus else 'no node has a GPU'})")


def trials_at_once(spec: SpecBase, fits: int) -> int:
    """How many trials run at once: as many as fit (`check_resources`), at most `search.max_concurrent` and the
    number of trials."""
    return min(spec.search.max_concurrent or fits, spec.search.num_samples)


def check_resources(spec: SpecBase, nodes: list[dict[str, Any]]) -> int:
    """Fail before any trial when one trial cannot be placed on the nodes; return how many trials fit at once.

    Each worker must fit on a single node (Ray places a worker's CPUs and GPUs together); a
    multi-worker trial also needs a little CPU for its Ray Train driver.
    """
    r, gpus = spec.resources, gpus_per_worker(spec, nodes)

    def workers_on(node: dict[str, Any]) -> int:
        fits = [node["CPU"] / r.cpus_per_worker] + ([node["GPU"] / gpus] if gpus else [])
        return math.floor(min(fits) + 1e-9)

    slots = sum(workers_on(n) for n in nodes)
    if r.num_workers == 1:
        trials = slots
    else:
        per_trial_cpu = r.num_workers * r.cpus_per_worker + TRAIN_DRIVER_CPU
        trials = min(slots // r.num_workers, math.floor(sum(n["CPU"] for n in nodes) / per_trial_cpu + 1e-9))
    if trials < 1:
        offered = "; ".join(f"{n['address']}: {n['CPU']:g} CPU, {n['GPU']:g} GPU" for n in nodes) or "no alive nodes"
        driver = f" plus {TRAIN_DRIVER_CPU:g} CPU for its Ray Train driver" if r.num_workers > 1 else ""
        raise SpecError(
            f"resources: one trial asks for {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
            f"{gpus:g} GPU), each worker on one node{driver}, but the Ray cluster's nodes offer "
            f"{offered}; lower resources.num_workers, cpus_per_worker or gpus_per_worker, or add nodes"
        )
    return trials


def check_cluster_paths(storage: StoragePath, uri: str, ray_address: str, nodes: list[dict[str, Any]]) -> None:
    """On a cluster, trials write checkpoints from every node and the driver may not run here:
    the storage path must be visible on all nodes, and a file-based MLflow store only works
    when the driver runs on this machine (not through a ray:// client)."""
    if ray_address.startswith("ray://") and not uri.startswith(("http://", "https://", "databricks")):
        raise SpecError(
            f"mlflow.tracking_uri: {uri} is a file on this machine, but with a Ray Client address ({ray_address}) "
            "the search's driver runs on the cluster's head node; run `mlflow server --backend-store-uri "
            "sqlite:///mlflow.db --host 0.0.0.0` where both can reach it and set mlflow.tracking_uri to its http:// URL")
    if storage.local is None:
        check_object_storage(storage, nodes, ray_address)
        return
    if ray_address == "local" and len(nodes) <= 1:
        return  # one machine: nothing to check
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return os.path.exists(path)

    storage.local.mkdir(parents=True, exist_ok=True)
    marker = storage.local / f".ssl-tune-visible-{uuid.uuid4().hex}"
    marker.write_text("written by the ssl-tune driver to check that every node sees this directory\n")
    try:
        seen = [(n, exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False))
                 .remote(str(marker))) for n in nodes]
        blind = [f"{n['address']} ({n['id'][:8]})" for n, ref in seen if not ray.get(ref, timeout=120)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SpecError(
            f"storage_path: {storage} is not visible from node(s) {', '.join(blind)}, where trials would write their "
            "checkpoints; use a directory on a file system shared by all nodes (e.g. NFS) or a URI such as "
            "s3://bucket/path")


# How long `--address HOST:PORT` may take to accept a TCP connection before the search gives up.
ADDRESS_PROBE_TIMEOUT_S = 5.0


def check_address_answers(address: str, timeout: float = ADDRESS_PROBE_TIMEOUT_S) -> None:
    """Raise `SpecError` within `timeout` s if nothing listens at a Ray address ("host:port" or
    "ray://host:port"). Ray itself retries a dead address for many minutes before it gives up."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"--address {address}: not a Ray address; use HOST:PORT (the head's GCS port, "
                        "usually 6379), ray://HOST:10001 (Ray Client) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        what = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__).lower()
        raise SpecError(
            f"--address {address}: no Ray cluster answers there ({what} within {timeout:g} s); start one with "
            "`ray start --head --port 6379` on the head node, check the host, port and firewall "
            f"({'10001 for ray://' if address.startswith('ray://') else 'the GCS port, 6379 by default'}), or leave "
            "--address and RAY_ADDRESS unset to run on a local Ray instance") from None


def init_ray(address: str | None, *, log_to_driver: bool = True) -> str:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            check_address_answers(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
            except ConnectionError as exc:  # e.g. "auto" with no cluster on this machine
                raise SpecError(f"--address {address}: {str(exc).splitlines()[0]}") from None
        else:
            # "local": a new instance even if a `ray start` cluster runs on this machine.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=log_to_driver)
    return address or "local"


def _check_batch(spec: SpecBase, images: int) -> None:
    from ssl_tune.data.datasets import subset_size

    kept = subset_size(spec.data.subset, images)
    if kept > images:
        raise SpecError(f"data.subset ({spec.data.subset}) asks for more than data set {spec.data.name!r} holds "
                        f"({images} training images)")
    if spec.training.batch_size > kept:
        raise SpecError(f"training.batch_size ({spec.training.batch_size}) is larger than data set "
                        f"{spec.data.name!r} ({kept} images{' in data.subset' if kept < images else ''})")


@functools.cache
def _bundled_training_images() -> int:
    from ssl_tune.data.datasets import load_bundled

    return len(load_bundled().ssl_images)  # read once: a local search checks before Ray and again after


def _check_bundled_batch(spec: SpecBase) -> bool:
    """`_check_batch` for the bundled data set, which needs no cache (False for any other data set)."""
    if spec.data.name != "fashion_mnist_subset":
        return False
    _check_batch(spec, _bundled_training_images())
    return True


def trial_nodes(spec: SpecBase, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes where at least one of the spec's trial workers fits (those that will run trials)."""
    r, gpus = spec.resources, gpus_per_worker(spec, nodes)
    return [n for n in nodes if n["CPU"] >= r.cpus_per_worker - 1e-9 and (not gpus or n["GPU"] >= gpus - 1e-9)]


class _Lines:
    """A text stream that sends each complete line to the driver's `_ProgressBoard` actor."""

    def __init__(self, board, node: str) -> None:
        self.board, self.node, self.partial, self.last = board, node, "", None

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text.replace("\r", "\n")).split("\n")
        for line in lines:
            if line.strip():
                self.last = self.board.add.remote(self.node, line.strip())
        return len(text)

    def flush(self) -> None:
        """Nothing is held back: every complete line was sent when written (`posted` waits for them)."""

    def posted(self) -> None:
        """Wait until every line is on the board (an actor runs one caller's calls in order)."""
        import ray

        if self.last is not None:
            ray.get(self.last)


def _build_cache_on_node(data, refresh: bool, workers: int, board) -> tuple[str, Any, int]:
    """A Ray task on one node: build or reuse that node's cache with `workers` processes; returns the
    node's address, the cache's `CacheInfo` and the number of pretraining images."""
    import ray

    from ssl_tune.data.cache import open_dataset

    node = ray.util.get_node_ip_address()
    lines = _Lines(board, node)
    try:
        dataset, info = open_dataset(data, stream=lines, refresh=refresh, workers=workers)
    finally:
        lines.posted()  # the driver prints them all before it reads this task's result
    return node, info, len(dataset.ssl_images)


def prepare_data(spec: SpecBase, nodes: list[dict[str, Any]], *, refresh: bool = False, stream=None):
    """Build (or check) the spec's data cache on every node that will run trials, before any trial:
    one Ray task per node, pinned to it and holding all its CPUs, which it decodes with. Their
    progress is printed here, one line per update, prefixed with the node. A data set the user must
    fix (exit 2), or nodes that see different sources, raise SpecError naming the node. Trials then
    only map the cache (`open_dataset(build=False)`) and never decode while they hold GPUs.
    Returns one node's `CacheInfo` (None for the bundled data set, which ships decoded)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ssl_tune.data.datasets import DataError

    stream = stream or sys.stdout
    if _check_bundled_batch(spec):
        return None
    targets = trial_nodes(spec, nodes)
    board: Any = ray.remote(num_cpus=0)(_ProgressBoard).remote()  # an actor handle (Ray's stubs type it as the class)
    task = ray.remote(_build_cache_on_node)
    refs = {task.options(num_cpus=n["CPU"], scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False))
            .remote(spec.data, refresh, max(1, int(n["CPU"])), board): n for n in targets}
    pending, shown = list(refs), 0
    while True:
        _, pending = ray.wait(pending, timeout=1.0)
        lines = ray.get(board.lines.remote(shown))
        shown += len(lines)
        for node_ip, line in lines:
            print(f"[{node_ip}] {line}", file=stream, flush=True)
        if not pending:
            break
    results = []
    for ref, node in refs.items():
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, DataError) else None
            if cause is None:
                raise
            raise SpecError(f"data: {spec.data.name} (data.root {spec.data.root}) on node {node['address']}: "
                            f"{cause}") from None
    ray.kill(board)
    fingerprints = {info.manifest["fingerprint"]: address for address, info, _ in results}
    if len(fingerprints) > 1:
        raise SpecError(f"data.root {spec.data.root}: the nodes see different files ({', '.join(fingerprints.values())} "
                        "differ); give every node the same data")
    for address, info, _ in results:
        print(f"[{address}] {info.summary()}", file=stream, flush=True)
    _check_batch(spec, results[0][2])
    return results[0][1]


class _ProgressBoard:
    """A Ray actor the per-node cache tasks post their progress lines to, for the driver to print."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, str]] = []

    def add(self, node: str, line: str) -> None:
        self.posted.append((node, line))

    def lines(self, start: int) -> list[tuple[str, str]]:
        return self.posted[start:]


def prepare_cluster(spec: SpecBase, storage: StoragePath, uri: str, address: str | None, verbose: bool) -> tuple[str, int, Any]:
    """Connect to Ray and, before any trial, check that the trials fit and can write where they must,
    and build the data cache on every node that will run them (`prepare_data`). Returns the address,
    how many trials fit at once, and the cache's `CacheInfo`."""
    ray = sys.modules.get("ray")
    if not (address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized())):
        # A local instance: a trial that cannot fit this machine, or a batch larger than the bundled data,
        # is refused before Ray starts (and checked again below on the node Ray reports).
        check_resources(spec, local_nodes())
        _check_bundled_batch(spec)
    ray_address = init_ray(address, log_to_driver=verbose)
    nodes = node_resources()
    chose = resolve_gpus(spec, nodes)
    if chose:
        print(chose, file=sys.__stdout__, flush=True)
    fits = check_resources(spec, nodes)
    check_cluster_paths(storage, uri, ray_address, nodes)
    data = prepare_data(spec, nodes, stream=sys.__stdout__)  # our console, not Ray's log
    return ray_address, fits, data
