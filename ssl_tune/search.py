"""`ssl-tune run`: a Ray Tune search with Optuna's TPE and ASHA over a spec's ranges.

Each trial trains one resolved spec with the shared loop (`trainers.loop.Trainer`):

* ``resources.num_workers > 1``: the trial launches a Ray Train `TorchTrainer`; its DDP workers run
  the loop and report through Ray Train (`TuneReportCallback` forwards rank 0's all-reduced metrics).
* ``resources.num_workers == 1``: the loop runs inside the Tune trial itself and reports through
  Tune. Starting a Train run (controller, worker group, process group) costs about 20 s on a
  2-core machine, as much as a short trial's work; running in place costs nothing and is the same
  code, with the same metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ssl_tune import __version__
from ssl_tune.spec import Choice, IntRange, LogUniform, SpecBase, SpecError, Uniform, range_default, spec_model
from ssl_tune import tracking
from trainers.loop import Reporter

# The Tune trial that drives a multi-worker Train run needs a little CPU of its own (0 is refused).
TRAIN_DRIVER_CPU = 0.01


# Optuna names a branch's sub-range "field.path|value", so each branch has its own distribution.
BRANCH_SEPARATOR = "|"


def _suggest(trial, name: str, r) -> Any:
    if isinstance(r, Uniform):
        return trial.suggest_float(name, r.low, r.high)
    if isinstance(r, LogUniform):
        return trial.suggest_float(name, r.low, r.high, log=True)
    if isinstance(r, IntRange):
        return trial.suggest_int(name, r.low, r.high, step=r.step, log=r.log)
    return trial.suggest_categorical(name, r.values)


class SearchSpace:
    """Optuna define-by-run space over a spec's ranges; a choice's branch is sampled only when taken.

    A class rather than a closure so that Tune can pickle the searcher with it.
    """

    def __init__(self, spec: SpecBase) -> None:
        self.ranges = spec.search_ranges()

    def __call__(self, trial) -> None:
        for path, r in self.ranges.items():
            value = _suggest(trial, path, r)
            if isinstance(r, Choice):
                for sub_path, sub in r.branches.get(str(value), {}).items():
                    _suggest(trial, f"{sub_path}{BRANCH_SEPARATOR}{value}", sub)


def optuna_names(spec: SpecBase, values: dict[str, Any]) -> dict[str, Any]:
    """Field paths -> Optuna parameter names (for warm-start points)."""
    branch_of = {}
    for (path, value), branch in spec.branch_ranges().items():
        chosen = values.get(path, range_default(spec.search_ranges()[path]))
        if str(chosen) == value:
            branch_of.update({sub_path: value for sub_path in branch})
    return {(f"{k}{BRANCH_SEPARATOR}{branch_of[k]}" if k in branch_of else k): v for k, v in values.items()}


def field_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config (Optuna names) -> field paths, as `SpecBase.resolve` takes them."""
    return {name.split(BRANCH_SEPARATOR)[0]: value for name, value in config.items()}


def startup_trials(spec: SpecBase) -> int:
    """Trials TPE samples at random before modelling: `search.startup_trials`, else 2 per searched
    parameter, at most Optuna's default of 10.

    With Optuna's 10, a search of 8 trials (the shipped specs) never leaves random sampling. On the
    search-efficiency benchmark (docs/benchmarks.md, 2 parameters), TPE alone needed 0.95 of random
    search's compute to reach random search's result, TPE + ASHA 0.52; with 2 per parameter, 0.67 and 0.31.
    """
    return spec.search.startup_trials or min(10, 2 * len(spec.searchable_paths()))


def build_search_algorithm(spec: SpecBase, max_concurrent: int):
    """OptunaSearch with the spec's seeded sampler (TPE or random), limited to `max_concurrent` open trials.

    Trials stopped early by ASHA reach Optuna as completed with their last (low-fidelity) value:
    ASHA stops a trial only when it ranks low among trials at the same epoch, so the lower value
    is a fair signal for TPE that the region is worse.
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    algorithm = OptunaSearch(
        space=SearchSpace(spec),
        metric=s.metric,
        mode=s.mode,
        sampler=(optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup_trials(spec)) if s.sampler == "tpe"
                 else optuna.samplers.RandomSampler(seed=s.seed)),
        points_to_evaluate=[optuna_names(spec, p) for p in s.points_to_evaluate] or None,
    )
    return ConcurrencyLimiter(algorithm, max_concurrent=max_concurrent)


def build_scheduler(spec: SpecBase):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.search
    if s.scheduler == "none":
        return FIFOScheduler()
    # The trainer's own `epoch`, not Tune's training_iteration, which restarts after a trial restore.
    return ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=spec.training.epochs,
                         grace_period=min(s.grace_period, spec.training.epochs), reduction_factor=s.reduction_factor)


# --- trials ---------------------------------------------------------------------------------


class RayReporter(Reporter):
    """Sends each epoch's metrics and checkpoint to Tune or Ray Train: `report` and `checkpoint_class`
    are `ray.tune.report` and `ray.tune.Checkpoint`, or their `ray.train` counterparts."""

    def __init__(self, report: Callable[..., None], checkpoint_class: type, extra: dict[str, float] | None = None) -> None:
        self.report, self.checkpoint_class, self.extra = report, checkpoint_class, extra or {}
        self.once: dict[str, float] = {}  # sent with the next result only

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="ssl-tune-ckpt-") as tmp:
            checkpoint = None
            if write_checkpoint is not None:
                write_checkpoint(Path(tmp))
                checkpoint = self.checkpoint_class.from_directory(tmp)
            self.report({**metrics, **self.extra, **self.once}, checkpoint=checkpoint)
            self.once = {}


# A multi-worker trial's Ray Train run records its placement group here (in the run's directory),
# so that the trial can remove it if the run dies in a way Ray Train does not clean up after.
PLACEMENT_GROUPS_FILE = ".placement_groups"


def record_placement_group(run_dir: Path) -> None:
    import ray

    group = ray.util.get_current_placement_group()
    if group is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / PLACEMENT_GROUPS_FILE, "a") as f:
            f.write(group.id.hex() + "\n")


def remove_leftover_placement_groups(run_dir: Path) -> list[str]:
    """Remove the placement groups earlier attempts of this Ray Train run recorded and that still
    hold resources. A node lost under a run can leave its group RESCHEDULING with the surviving
    bundles reserved, so the restarted trial (or any other) could not be placed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        recorded = (run_dir / PLACEMENT_GROUPS_FILE).read_text().split()
    except OSError:
        return []
    removed = []
    for group_id in dict.fromkeys(recorded):
        group = PlacementGroup(PlacementGroupID.from_hex(group_id))
        if ray.util.placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(group_id)
    return removed


def train_worker(config: dict[str, Any]) -> None:
    """Train one resolved spec; runs in a Tune trial (`via` "tune") or a Ray Train worker ("train")."""
    import ray.train
    import ray.tune
    import torch

    from ssl_tune.data.cache import open_dataset
    from ssl_tune.data.datasets import DataError
    from trainers.loop import Trainer, default_device

    spec = spec_model().model_validate(config["spec"])
    torch.set_num_threads(max(1, math.ceil(spec.resources.cpus_per_worker)))
    extra = {}
    if config["via"] == "train":
        import ray.train.torch
        import torch.distributed as dist

        api, device = ray.train, ray.train.torch.get_device()
        nodes: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        extra["worker_nodes"] = float(len(set(nodes)))  # how many Ray nodes this trial's workers sit on
        if dist.get_rank() == 0:
            record_placement_group(Path(config["run_dir"]))
    else:
        api, device = ray.tune, default_device()
    checkpoint = api.get_checkpoint()
    report = RayReporter(api.report, api.Checkpoint, extra)

    def fail(epoch: int, reason: str) -> None:
        # Deterministic failures end the trial without an exception, so Tune does not retry them. A NaN
        # objective: Optuna records the trial as failed, ASHA ignores the value.
        api.report({"epoch": float(epoch), spec.search.metric: math.nan, tracking.FAILURE_KEY: reason})

    try:
        # This node's copy of the cache, built here (once per node, under a lock) if it has none.
        dataset, _ = open_dataset(spec.data, expected=config.get("data_fingerprint"))
        trainer = Trainer(spec, dataset=dataset, device=device)
    except DataError as exc:  # the driver checked the data; this node sees something else
        fail(0, f"data: {exc}")
        return
    if checkpoint is not None:  # a restarted or resumed trial
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(Path(directory))
        report.once[tracking.RESTORED_FROM_KEY] = float(trainer.epoch)
    result = trainer.fit(report)
    if result.status == "diverged":
        fail(result.epochs_completed, f"diverged: {result.message}")


def run_trial(config: dict[str, Any], base_spec: dict[str, Any], data_fingerprint: str | None = None) -> None:
    """Tune function trainable: `config` holds the sampled values by dotted path."""
    import ray.tune

    spec = spec_model().model_validate(base_spec).resolve(field_values(config))
    payload = {"spec": spec.model_dump(mode="json"), "data_fingerprint": data_fingerprint}
    r = spec.resources
    if r.num_workers == 1:
        train_worker({**payload, "via": "tune"})
        return
    context = ray.tune.get_context()
    storage_path, name = str(Path(context.get_trial_dir()).parent), f"train-{context.get_trial_id()}"
    run_dir = Path(storage_path) / name
    if remove_leftover_placement_groups(run_dir):  # left by an attempt that died with its node
        print(f"removed placement groups left behind by an earlier attempt of trial {context.get_trial_id()}")
    try:
        _fit_train_run(spec, payload, storage_path, name, run_dir)
    finally:
        remove_leftover_placement_groups(run_dir)


def _fit_train_run(spec: SpecBase, payload: dict[str, Any], storage_path: str, name: str, run_dir: Path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = spec.resources
    TorchTrainer(
        train_worker,
        train_loop_config={**payload, "via": "train", "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0, placement_strategy=r.placement_strategy,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,  # fixed per trial: a retried trial finds its checkpoints
            storage_path=storage_path,
            callbacks=[TuneReportCallback()],
            checkpoint_config=checkpoint_config(spec, train=True),
            # A dead worker or node, or workers that cannot be placed within the worker-group start
            # timeout: the run fails at once and Tune restarts the trial (search.max_failures) from
            # the latest checkpoint, the same way as a single-worker trial. The restart is then
            # visible (console, MLflow), and leftover placement groups are removed in between.
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    ).fit()


def checkpoint_config(spec: SpecBase, *, train: bool):
    """Keep the best checkpoint by the objective; Ray's managers also keep the latest."""
    import ray.train
    import ray.tune

    cls = ray.train.CheckpointConfig if train else ray.tune.CheckpointConfig
    return cls(num_to_keep=1, checkpoint_score_attribute=spec.search.metric, checkpoint_score_order=spec.search.mode)


# --- the driver -------------------------------------------------------------------------------


def tune_trial_resources(spec: SpecBase) -> dict[str, float]:
    """What the Tune trial itself reserves: the whole work for one worker, else only the Train driver
    (Ray Train's workers reserve their own resources)."""
    r = spec.resources
    if r.num_workers == 1:
        return {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    return {"CPU": TRAIN_DRIVER_CPU, "GPU": 0.0}


def node_resources() -> list[dict[str, Any]]:
    """The alive nodes of the connected Ray cluster: id, address, CPU and GPU."""
    import ray

    return [{"id": n["NodeID"], "address": n["NodeManagerAddress"], "CPU": float(n["Resources"].get("CPU", 0)),
             "GPU": float(n["Resources"].get("GPU", 0))} for n in ray.nodes() if n["Alive"]]


def check_resources(spec: SpecBase, nodes: list[dict[str, Any]]) -> int:
    """Fail before any trial when one trial cannot be placed on the nodes; return how many trials fit at once.

    Each worker must fit on a single node (Ray places a worker's CPUs and GPUs together); a
    multi-worker trial also needs a little CPU for its Ray Train driver.
    """
    r = spec.resources

    def workers_on(node: dict[str, Any]) -> int:
        fits = [node["CPU"] / r.cpus_per_worker] + ([node["GPU"] / r.gpus_per_worker] if r.gpus_per_worker else [])
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
            f"{r.gpus_per_worker:g} GPU), each worker on one node{driver}, but the Ray cluster's nodes offer "
            f"{offered}; lower resources.num_workers, cpus_per_worker or gpus_per_worker, or add nodes"
        )
    return trials


def check_cluster_paths(storage: str, uri: str, ray_address: str, nodes: list[dict[str, Any]]) -> None:
    """On a cluster, trials write checkpoints from every node and the driver may not run here:
    the storage path must be visible on all nodes, and a file-based MLflow store only works
    when the driver runs on this machine (not through a ray:// client)."""
    if ray_address.startswith("ray://") and not uri.startswith(("http://", "https://", "databricks")):
        raise SpecError(
            f"mlflow.tracking_uri: {uri} is a file on this machine, but with a Ray Client address ({ray_address}) "
            "the search's driver runs on the cluster's head node; run `mlflow server --backend-store-uri "
            "sqlite:///mlflow.db --host 0.0.0.0` where both can reach it and set mlflow.tracking_uri to its http:// URL")
    if "://" in storage or (ray_address == "local" and len(nodes) <= 1):
        return  # a URI (s3://, gs://, ...) or one machine: nothing to check
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(path: str) -> bool:
        return os.path.exists(path)

    Path(storage).mkdir(parents=True, exist_ok=True)
    marker = Path(storage) / f".ssl-tune-visible-{uuid.uuid4().hex}"
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


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


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
                ray.init(address=address, logging_level="WARNING", log_to_driver=log_to_driver)
            except ConnectionError as exc:  # e.g. "auto" with no cluster on this machine
                raise SpecError(f"--address {address}: {str(exc).splitlines()[0]}") from None
        else:
            # "local": a new instance even if a `ray start` cluster runs on this machine.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                     log_to_driver=log_to_driver)
    return address or "local"


@contextlib.contextmanager
def _console(log_path: Path, verbose: bool):
    """Quiet by default: Ray's own output goes to `log_path`, the console shows our table."""
    if verbose:
        yield
        return
    import ray  # noqa: F401  (its loggers must exist before they are redirected)

    from ssl_tune.console import ray_output_to

    print(f"Ray's own output: {log_path}  (--verbose shows it here)", flush=True)
    with ray_output_to(log_path):
        yield


def _driver_log(storage: str, run_name: str) -> Path:
    base = Path(storage) if "://" not in storage else Path("ssl_tune_runs")
    return base / f"{run_name}.log"


def check_data(spec: SpecBase):
    """Build or check the spec's data cache on this node once, before any trial: a missing root, an
    empty class folder or a file that does not decode is the user's to fix (exit 2), not a trial
    failure to retry. Returns the cache's `CacheInfo` (None for the bundled data set)."""
    from ssl_tune.data.cache import open_dataset
    from ssl_tune.data.datasets import DataError

    try:
        dataset, info = open_dataset(spec.data)
    except DataError as exc:
        raise SpecError(f"data: {spec.data.name} (data.root {spec.data.root}): {exc}") from None
    if info is not None:
        print(info.summary(), flush=True)
    if spec.training.batch_size > len(dataset.ssl_images):
        raise SpecError(f"training.batch_size ({spec.training.batch_size}) is larger than data set "
                        f"{spec.data.name!r} ({len(dataset.ssl_images)} images)")
    return info


def _prepare_cluster(spec: SpecBase, storage: str, uri: str, address: str | None, verbose: bool) -> tuple[str, int]:
    """Connect to Ray and check, before any trial, that the trials fit and can write where they must."""
    ray_address = init_ray(address, log_to_driver=verbose)
    nodes = node_resources()
    fits = check_resources(spec, nodes)
    check_cluster_paths(storage, uri, ray_address, nodes)
    return ray_address, fits


@dataclass
class SearchOutcome:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]
    best_run_id: str | None
    interrupted: bool = False
    trials_done: int = 0
    trials_ok: int = 0  # finished or stopped early by ASHA; not failed, diverged or stopped on bad data
    storage: str = ""  # the storage path holding the search's Tune state

    @property
    def all_failed(self) -> bool:
        return not self.interrupted and self.trials_ok == 0


def _trainable(spec: SpecBase, data):
    """The Tune trainable; trials map the data cache whose source fingerprint the driver checked (`data`)."""
    from ray import tune

    fingerprint = data.manifest["fingerprint"] if data is not None else None
    return tune.with_resources(tune.with_parameters(run_trial, base_spec=spec.model_dump(mode="json"),
                                                    data_fingerprint=fingerprint), tune_trial_resources(spec))


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c():
    """SIGTERM (e.g. a scheduler ending the job) takes Tune's graceful Ctrl-C path: trials stop,
    the experiment state is saved, and `ssl-tune resume` can continue."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_search(spec: SpecBase, *, spec_source: str, name: str | None = None, address: str | None = None,
               verbose: bool = False) -> SearchOutcome:
    """Run the whole search of `spec` and record it in MLflow; returns the leaderboard."""
    if spec.is_resolved:
        raise SpecError(f"invalid spec {spec_source}: it has no search ranges; use `ssl-tune train` for one configuration")
    run_name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri(spec)
    tracking.check_reachable(uri)
    tracking.bound_http_retries()
    data = check_data(spec)
    storage = str(Path(spec.storage_path).resolve()) if "://" not in spec.storage_path else spec.storage_path
    with _console(_driver_log(storage, run_name), verbose):
        return _start_search(spec, spec_source, run_name, uri, storage, address, verbose, data)


def _start_search(spec: SpecBase, spec_source: str, run_name: str, uri: str, storage: str, address: str | None,
                  verbose: bool, data) -> SearchOutcome:
    from ray import tune

    from ssl_tune.console import ConsoleTable

    experiment_name = spec.mlflow.experiment_name or spec.name
    ray_address, fits = _prepare_cluster(spec, storage, uri, address, verbose)
    max_concurrent = min(spec.search.max_concurrent or fits, spec.search.num_samples)

    client = tracking.client_for(uri)
    experiment = tracking.experiment_id(client, experiment_name)
    searched = spec.searchable_paths()
    parent = client.create_run(experiment, run_name=run_name, tags={
        tracking.TAG_KIND: "search",
        "ssl_tune.spec_hash": spec.digest(),
        "ssl_tune.spec_source": spec_source,
        "ssl_tune.git_commit": _git_commit(),
        "ssl_tune.ray_address": ray_address,
        "ssl_tune.version": __version__,
        tracking.TAG_STORAGE: f"{storage.rstrip('/')}/{run_name}",
        tracking.TAG_METRIC: spec.search.metric,
        tracking.TAG_MODE: spec.search.mode,
        tracking.TAG_SEARCHED: ",".join(searched),
    })
    parent_id = parent.info.run_id
    client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    tracking.log_params(client, parent_id, {"num_samples": spec.search.num_samples, "max_concurrent": max_concurrent,
                                            "scheduler": spec.search.scheduler, "metric": spec.search.metric})
    if data is not None:  # the driver's node's cache; every node builds or reuses its own
        tracking.log_params(client, parent_id, {"data.cache": data.path,
                                                "data.train_images": data.manifest["splits"]["train"]["shape"][0]})
        tracking.log_metrics(client, parent_id, {"data_skipped_corrupt": data.skipped}, step=0)

    tuner = tune.Tuner(
        _trainable(spec, data),
        tune_config=tune.TuneConfig(search_alg=build_search_algorithm(spec, max_concurrent),
                                    scheduler=build_scheduler(spec), num_samples=spec.search.num_samples,
                                    # a new trial reuses a finished trial's process: no fresh imports
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage,
            callbacks=[tracking.MlflowTrialLogger(uri, experiment, parent_id, spec)] + ([] if verbose else [ConsoleTable(spec)]),
            checkpoint_config=checkpoint_config(spec, train=False),
            # A trial whose worker died restarts from its latest checkpoint, in the same MLflow run.
            failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
            verbose=1 if verbose else 0,
        ),
    )
    return _fit_and_record(tuner, spec, client, parent_id, experiment_name, uri, storage)


def trusted_experiment_dir(tagged: str, storage_path: str | None, run_ref: str) -> str:
    """The Tune experiment directory a search's parent run names, if the user vouches for it.

    Resuming unpickles `tuner.pkl` from that directory, and anyone who can write tags on a shared
    tracking server could point the tag elsewhere; so the directory must sit directly in the storage
    path given on the command line (`--storage-path`), by default the spec default `ssl_tune_runs` here.
    """
    root = storage_path or SpecBase.model_fields["storage_path"].default
    given = "--storage-path " + root if storage_path else f"the default storage path ./{root}"

    def normal(path: str) -> str:
        return path.rstrip("/") if "://" in path else str(Path(path).resolve())

    parent = tagged.rstrip("/").rpartition("/")[0] if "://" in tagged else str(Path(tagged).parent)
    if not tagged or normal(parent) != normal(root):
        raise SpecError(
            f"resume: the search's MLflow run names its Tune state at {tagged or '(nothing)'}, which is not in {given}; "
            "resuming unpickles that state (tuner.pkl), so ssl-tune reads it only from a storage path you name. If you "
            f"trust that directory: ssl-tune resume {run_ref} --storage-path {parent or 'DIR'}")
    return normal(tagged)


def resume_search(experiment_or_run: str, *, tracking_uri: str | None = None, address: str | None = None,
                  verbose: bool = False, storage_path: str | None = None) -> SearchOutcome:
    """Continue an interrupted search: unfinished trials resume from their checkpoints, the remaining
    samples run, finished trials are kept; the same MLflow parent and child runs are used."""
    from ray import tune

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    tracking.bound_http_retries()
    client = tracking.client_for(uri)
    try:
        parent = tracking.find_parent_run(client, experiment_or_run, unfinished=True)
    except LookupError as exc:
        raise SpecError(f"resume: {exc} in {uri}") from None
    parent_id = parent.info.run_id
    if parent.info.status in tracking.ENDED:
        raise SpecError(f"resume: search {parent.info.run_name!r} ({parent_id}) already ended ({parent.info.status}); "
                        "nothing to resume")
    storage = trusted_experiment_dir(parent.data.tags.get(tracking.TAG_STORAGE, ""), storage_path, experiment_or_run)
    if not tune.Tuner.can_restore(storage):
        raise SpecError(f"resume: no Tune experiment state at {storage!r} for search {parent.info.run_name!r}; "
                        "it was removed, or the search stopped before its first trial started")
    with tempfile.TemporaryDirectory() as tmp:
        spec_text = Path(client.download_artifacts(parent_id, "spec.yaml", tmp)).read_text()
    spec = spec_model().model_validate(yaml.safe_load(spec_text))
    data = check_data(spec)
    with _console(_driver_log(str(Path(storage).parent), Path(storage).name), verbose):
        _prepare_cluster(spec, str(Path(storage).parent), uri, address, verbose)
        return _resume(spec, storage, client, parent, uri, data)


def _resume(spec: SpecBase, storage: str, client, parent, uri: str, data) -> SearchOutcome:
    from ray import tune

    parent_id = parent.info.run_id
    client.update_run(parent_id, status="RUNNING")
    client.set_tag(parent_id, "ssl_tune.resumed", str(int(parent.data.tags.get("ssl_tune.resumed", "0")) + 1))
    # tuner.pkl is a pickle: `trusted_experiment_dir` checked that it lies where the user said.
    tuner = tune.Tuner.restore(storage, trainable=_trainable(spec, data), resume_unfinished=True,
                               resume_errored=False, restart_errored=False)
    experiment_name = client.get_experiment(parent.info.experiment_id).name
    return _fit_and_record(tuner, spec, client, parent_id, experiment_name, uri, storage.rstrip("/").rpartition("/")[0])


def _fit_and_record(tuner, spec: SpecBase, client, parent_id: str, experiment_name: str, uri: str,
                    storage: str) -> SearchOutcome:
    """Run the Tuner; then close the MLflow runs: the leaderboard if the search finished, else
    every unfinished trial's run KILLED and the parent KILLED, ready for `ssl-tune resume`."""
    try:
        with _sigterm_stops_like_ctrl_c():
            results = tuner.fit()
    except BaseException:
        _close_unfinished(client, client.get_run(parent_id))
        client.set_terminated(parent_id, "KILLED")
        raise
    parent = client.get_run(parent_id)
    done = results.num_terminated + results.num_errors
    ok = sum(r.error is None and tracking.FAILURE_KEY not in (r.metrics or {}) for r in results)
    # Runs still RUNNING belong to trials stopped by Ctrl-C/SIGTERM, or to a driver that died before.
    _close_unfinished(client, parent)
    if done < spec.search.num_samples:
        client.set_terminated(parent_id, "KILLED")
        rows = tracking.leaderboard(client, parent)
        return SearchOutcome(experiment_name, parent_id, uri, rows, None, interrupted=True, trials_done=done, trials_ok=ok,
                             storage=storage)
    rows = tracking.leaderboard(client, parent)
    searched = spec.searchable_paths()
    best = next((r for r in rows if not math.isnan(r["objective"]) and r["status"] != "FAILED"), None)
    if best is not None:
        best_run = client.get_run(best["run_id"])
        client.set_tag(parent_id, tracking.TAG_BEST_TRIAL_RUN, best["run_id"])
        tracking.log_params(client, parent_id, {f"best.{p}": best_run.data.params.get(p) for p in searched})
        tracking.log_metrics(client, parent_id, {f"best_{k}": v for k, v in best_run.data.metrics.items()}, step=0)
    client.log_text(parent_id, tracking.format_table(rows), "trials.txt")
    from ssl_tune import plots

    try:
        plots.log_search_figures(client, client.get_run(parent_id), spec)
    except Exception as exc:  # figures are a view of the results: never lose the finished search over one
        print(f"warning: the search's figures were not logged ({type(exc).__name__}: {exc})", file=sys.__stderr__)
    # A search in which no trial came through did not find anything: FAILED, and a non-zero exit.
    client.set_terminated(parent_id, "FINISHED" if ok else "FAILED")
    return SearchOutcome(experiment_name, parent_id, uri, rows, best["run_id"] if best else None, trials_done=done,
                         trials_ok=ok, storage=storage)


def _close_unfinished(client, parent) -> None:
    for child in tracking.child_runs(client, parent):
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, tracking.TAG_INTERRUPTED_AT, str(int(child.data.metrics.get("epoch", 0))))
            client.set_terminated(child.info.run_id, "KILLED")
