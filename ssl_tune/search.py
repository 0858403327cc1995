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

import math
import os
import subprocess
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


def build_search_algorithm(spec: SpecBase, max_concurrent: int):
    """OptunaSearch with a seeded TPE sampler, limited to `max_concurrent` open trials.

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
        sampler=optuna.samplers.TPESampler(seed=s.seed),
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


class TrialDiverged(RuntimeError):
    """Raised so that Tune records a diverged trial as failed, with this message."""


class RayReporter(Reporter):
    """Sends each epoch's metrics and checkpoint to Tune or Ray Train: `report` and `checkpoint_class`
    are `ray.tune.report` and `ray.tune.Checkpoint`, or their `ray.train` counterparts."""

    def __init__(self, report: Callable[..., None], checkpoint_class: type) -> None:
        self.report, self.checkpoint_class = report, checkpoint_class

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="ssl-tune-ckpt-") as tmp:
            checkpoint = None
            if write_checkpoint is not None:
                write_checkpoint(Path(tmp))
                checkpoint = self.checkpoint_class.from_directory(tmp)
            self.report(metrics, checkpoint=checkpoint)


def train_worker(config: dict[str, Any]) -> None:
    """Train one resolved spec; runs in a Tune trial (`via` "tune") or a Ray Train worker ("train")."""
    import ray.train
    import ray.tune
    import torch

    from trainers.loop import Trainer, default_device

    spec = spec_model().model_validate(config["spec"])
    torch.set_num_threads(max(1, math.ceil(spec.resources.cpus_per_worker)))
    if config["via"] == "train":
        import ray.train.torch

        api, device = ray.train, ray.train.torch.get_device()
    else:
        api, device = ray.tune, default_device()
    report, checkpoint = RayReporter(api.report, api.Checkpoint), api.get_checkpoint()
    trainer = Trainer(spec, device=device)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_checkpoint(Path(directory))
    result = trainer.fit(report)
    if result.status == "diverged":
        raise TrialDiverged(result.message)


def run_trial(config: dict[str, Any], base_spec: dict[str, Any]) -> None:
    """Tune function trainable: `config` holds the sampled values by dotted path."""
    import ray.tune

    spec = spec_model().model_validate(base_spec).resolve(field_values(config))
    payload = {"spec": spec.model_dump(mode="json")}
    r = spec.resources
    if r.num_workers == 1:
        train_worker({**payload, "via": "tune"})
        return
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    TorchTrainer(
        train_worker,
        train_loop_config={**payload, "via": "train"},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{context.get_trial_id()}",  # fixed per trial: a retried trial finds its checkpoints
            storage_path=str(Path(context.get_trial_dir()).parent),
            callbacks=[TuneReportCallback()],
            checkpoint_config=checkpoint_config(spec, train=True),
            # Fail instead of retrying forever when workers cannot be placed.
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


def trial_total_resources(spec: SpecBase) -> dict[str, float]:
    """Everything one trial holds while it runs."""
    r = spec.resources
    if r.num_workers == 1:
        return tune_trial_resources(spec)
    return {"CPU": TRAIN_DRIVER_CPU + r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}


def check_resources(spec: SpecBase, cluster: dict[str, float]) -> int:
    """Fail before any trial when one trial cannot fit; return how many trials fit at once."""
    need = trial_total_resources(spec)
    have = {k: float(cluster.get(k, 0)) for k in need}
    short = [k for k in need if need[k] > have[k] + 1e-9]
    if short:
        r = spec.resources
        raise SpecError(
            f"resources: one trial asks for {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
            f"{r.gpus_per_worker:g} GPU) = {need['CPU']:g} CPU and {need['GPU']:g} GPU, but the Ray cluster "
            f"has {have['CPU']:g} CPU and {have['GPU']:g} GPU in all; lower resources.num_workers, "
            "cpus_per_worker or gpus_per_worker, or add nodes"
        )
    fits = min(math.floor(have[k] / need[k] + 1e-9) for k in need if need[k] > 0)
    return max(1, fits)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def init_ray(address: str | None) -> str:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    return address or "local"


@dataclass
class SearchOutcome:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]
    best_run_id: str | None


def run_search(spec: SpecBase, *, spec_source: str, name: str | None = None, address: str | None = None,
               verbose: int = 1) -> SearchOutcome:
    """Run the whole search of `spec` and record it in MLflow; returns the leaderboard."""
    import ray
    from ray import tune

    if spec.is_resolved:
        raise SpecError(f"invalid spec {spec_source}: it has no search ranges; use `ssl-tune train` for one configuration")
    run_name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri(spec)
    experiment_name = spec.mlflow.experiment_name or spec.name
    ray_address = init_ray(address)
    fits = check_resources(spec, ray.cluster_resources())
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
        "ssl_tune.storage": str(Path(spec.storage_path).resolve() / run_name),
        tracking.TAG_METRIC: spec.search.metric,
        tracking.TAG_MODE: spec.search.mode,
        tracking.TAG_SEARCHED: ",".join(searched),
    })
    parent_id = parent.info.run_id
    client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    tracking.log_params(client, parent_id, {"num_samples": spec.search.num_samples, "max_concurrent": max_concurrent,
                                            "scheduler": spec.search.scheduler, "metric": spec.search.metric})

    trainable = tune.with_resources(tune.with_parameters(run_trial, base_spec=spec.model_dump(mode="json")),
                                    tune_trial_resources(spec))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=build_search_algorithm(spec, max_concurrent),
                                    scheduler=build_scheduler(spec), num_samples=spec.search.num_samples,
                                    # a new trial reuses a finished trial's process: no fresh imports
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(Path(spec.storage_path).resolve()),
            callbacks=[tracking.MlflowTrialLogger(uri, experiment, parent_id, spec)],
            checkpoint_config=checkpoint_config(spec, train=False),
            verbose=verbose,
        ),
    )
    try:
        tuner.fit()
    except BaseException:
        client.set_terminated(parent_id, "KILLED")
        raise
    rows = tracking.leaderboard(client, client.get_run(parent_id))
    best = next((r for r in rows if not math.isnan(r["objective"])), None)
    if best is not None:
        best_run = client.get_run(best["run_id"])
        client.set_tag(parent_id, tracking.TAG_BEST_TRIAL_RUN, best["run_id"])
        tracking.log_params(client, parent_id, {f"best.{p}": best_run.data.params.get(p) for p in searched})
        tracking.log_metrics(client, parent_id, {f"best_{k}": v for k, v in best_run.data.metrics.items()}, step=0)
    client.log_text(parent_id, tracking.format_table(rows), "trials.txt")
    client.set_terminated(parent_id, "FINISHED")
    return SearchOutcome(experiment_name, parent_id, uri, rows, best["run_id"] if best else None)
