"""One trial: train one resolved spec inside a Tune trial, or as a Ray Train run of DDP workers.

Each trial trains one resolved spec with the shared loop (`trainers.loop.Trainer`):

* ``resources.num_workers > 1``: the trial launches a Ray Train `TorchTrainer`; its DDP workers run
  the loop and report through Ray Train (`TuneReportCallback` forwards rank 0's all-reduced metrics).
* ``resources.num_workers == 1``: the loop runs inside the Tune trial itself and reports through
  Tune. Starting a Train run (controller, worker group, process group) costs about 20 s on a
  2-core machine, as much as a short trial's work; running in place costs nothing and is the same
  code, with the same metrics and checkpoints.

What a trial reports beyond the trainer's metrics (`FAILURE_KEY`, `RESTORED_FROM_KEY`,
`RESTORED_HISTORY_KEY`) is read by the tracking and console callbacks.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ssl_tune.trials.checkpoints import CheckpointError, write_error
from ssl_tune.searching.space import resolve_trial
from ssl_tune.spec import SpecBase
from ssl_tune.trials.uploads import TrialRecorder, reachable_here
from trainers import spec_model
from trainers.loop import DeviceOutOfMemory, Reporter

E = TypeVar("E", bound=BaseException)

# A result key (not a metric) that ends a trial as FAILED with its reason, without an exception:
# divergence and bad data are deterministic, so restarting the trial (`search.max_failures`) would
# only fail again.
FAILURE_KEY = "failure_reason"
# A result key (a metric too): the epoch of the checkpoint a restarted or resumed trial continued from.
RESTORED_FROM_KEY = "restored_from_epoch"
# A result key (a JSON list, not a metric) sent with RESTORED_FROM_KEY: the metrics of every epoch up to
# that checkpoint. Ray Train persists a checkpoint before its metrics reach Tune, so a node lost in
# between leaves a checkpoint whose epoch's metrics MLflow never got; the tracker fills them from here.
RESTORED_HISTORY_KEY = "restored_history"
# A result key (a string, not a metric): the trial cannot write its checkpoint because the storage path's
# disk is full. The driver then stops the whole search the way Ctrl-C does, so that it can be resumed.
STORAGE_FULL_KEY = "storage_full"
STORAGE_FULL_WAIT_S = 120.0
# A result key (a string, not a metric): the damaged checkpoint(s) a restored trial skipped, with the reason.
DAMAGED_CHECKPOINT_KEY = "damaged_checkpoint"


class RayReporter(Reporter):
    """Sends each epoch's metrics and checkpoint to Tune or Ray Train: `report` and `checkpoint_class`
    are `ray.tune.report` and `ray.tune.Checkpoint`, or their `ray.train` counterparts."""

    def __init__(self, report: Callable[..., None], checkpoint_class: Any, extra: dict[str, float] | None = None,
                 storage: str = "", recorder: TrialRecorder | None = None) -> None:
        self.report, self.checkpoint_class, self.extra = report, checkpoint_class, extra or {}
        self.storage = storage  # where Ray keeps this trial's checkpoints (for error messages; "": Tune's trial directory)
        self.once: dict[str, float | str] = {}  # sent with the next result only
        self.recorder, self.trainer = recorder, None

    def on_start(self, trainer) -> None:
        self.trainer = trainer

    def on_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        with tempfile.TemporaryDirectory(prefix="ssl-tune-ckpt-") as tmp:
            checkpoint = None
            if write_checkpoint is not None:
                write_checkpoint(Path(tmp))  # CheckpointError when it cannot be written whole
                checkpoint = self.checkpoint_class.from_directory(tmp)
                self._export(int(metrics["epoch"]))
            try:  # Ray copies the checkpoint into the storage path here
                self.report({**metrics, **self.extra, **self.once}, checkpoint=checkpoint)
            except Exception as exc:
                error = write_error(self.storage or _trial_storage(), exc)
                if error.disk_full:  # every retry would fill the same disk
                    raise error from None
                raise
            self.once = {}

    def _export(self, epoch: int) -> None:
        """At an epoch where the trial may end (ASHA's decisions, the last), hand the recorder the export
        of this epoch to upload to the trial's run."""
        t = self.trainer
        if self.recorder is None or t is None or not (epoch in t.decision_epochs or epoch == t.spec.training.epochs):
            return
        directory = Path(tempfile.mkdtemp(prefix="ssl-tune-export-"))  # the recorder deletes it once uploaded
        try:
            t.write_export(directory)
        except OSError as exc:  # a full local disk: the checkpoint in Ray's storage still holds it all
            shutil.rmtree(directory, ignore_errors=True)
            print(f"warning: the export of epoch {epoch} was not written ({exc}); it stays in Ray's storage only",
                  file=sys.stderr, flush=True)
            return
        self.recorder.upload_export(directory)


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

    from trainers.build import default_device

    spec = spec_model().model_validate(config["spec"])
    torch.set_num_threads(max(1, math.ceil(spec.resources.cpus_per_worker)))
    extra = {}
    recorder = None
    if config["via"] == "train":
        import ray.train.torch
        import torch.distributed as dist

        api: Any = ray.train  # (or ray.tune below: both give get_checkpoint, report and Checkpoint)
        device = ray.train.torch.get_device()
        nodes: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        extra["worker_nodes"] = float(len(set(nodes)))  # how many Ray nodes this trial's workers sit on
        if dist.get_rank() == 0:
            record_placement_group(Path(config["run_dir"]))
        if ray.train.get_context().get_local_rank() == 0:  # one system monitor per node; rank 0 uploads
            recorder = _recorder(config, ray.util.get_node_ip_address() if len(set(nodes)) > 1 else None)
    else:
        api, device = ray.tune, default_device()
        recorder = _recorder(config, None)
    checkpoint = api.get_checkpoint()
    report = RayReporter(api.report, api.Checkpoint, extra, storage=config.get("checkpoints_in", ""), recorder=recorder)
    try:
        _train(spec, config, api, device, checkpoint, report)
    finally:
        if recorder is not None:
            recorder.close()


def _recorder(config: dict[str, Any], node_id: str | None) -> TrialRecorder | None:
    """The trial's writer to its own MLflow run (`ssl_tune.trials.uploads`), where this node sees the store."""
    record = config.get("record")
    if not record or not reachable_here(record["uri"]):
        return None
    return TrialRecorder(record["uri"], record["parent_run_id"], record["trial_id"], node_id=node_id)


def _train(spec: SpecBase, config: dict[str, Any], api, device, checkpoint, report: RayReporter) -> None:
    from ssl_tune import distributed
    from ssl_tune.data.cache import open_dataset
    from ssl_tune.data.datasets import DataError
    from trainers.loop import Trainer

    def fail(epoch: int, reason: str) -> None:
        # Deterministic failures end the trial without an exception, so Tune does not retry them. A NaN
        # objective: Optuna records the trial as failed, ASHA ignores the value.
        api.report({"epoch": float(epoch), spec.search.metric: math.nan, FAILURE_KEY: reason})

    try:
        # This node's copy of the cache, which the driver had built on every node before any trial.
        dataset, _ = open_dataset(spec.data, expected=config.get("data_fingerprint"), build=False)
        trainer = Trainer(spec, dataset=dataset, device=device)
    except DataError as exc:  # the driver checked the data; this node sees something else
        fail(0, f"data: {exc}")
        return
    except DeviceOutOfMemory as exc:  # a restart would run out of memory again
        if config["via"] == "train":
            raise
        fail(0, str(exc))
        return
    if checkpoint is not None:  # a restarted or resumed trial
        try:
            restore(trainer, checkpoint, report)
        except CheckpointError as exc:  # retrying cannot mend a damaged file: fail now, naming it
            fail(0, f"no usable checkpoint to continue from: {exc}")
            return
        report.once[RESTORED_FROM_KEY] = float(trainer.epoch)
        report.once[RESTORED_HISTORY_KEY] = json.dumps(trainer.history)
        if trainer.epoch >= spec.training.epochs and trainer.history:
            # The last epoch's checkpoint, whose result may never have reached Tune (see
            # RESTORED_HISTORY_KEY): report it again, with its checkpoint, so the trial ends on it.
            report.on_start(trainer)
            report.on_epoch(trainer.history[-1], trainer.write_checkpoint if distributed.rank() == 0 else None)
            return
    try:
        result = trainer.fit(report)
    except DeviceOutOfMemory as exc:
        if config["via"] == "train":  # the other ranks wait at the next collective: end the run (see run_trial)
            raise
        fail(trainer.epoch, str(exc))
        return
    except CheckpointError as exc:
        if config["via"] == "train":  # the other ranks wait at the next collective: end the whole run
            raise
        if exc.disk_full:  # not this trial's fault: the driver stops the search, resumable once there is room
            # (the epoch before: this one's metrics were never reported, its checkpoint being unwritable)
            api.report({"epoch": float(trainer.epoch - 1), spec.search.metric: math.nan, STORAGE_FULL_KEY: str(exc)})
            time.sleep(STORAGE_FULL_WAIT_S)  # stopped meanwhile, unfinished; else (no driver heard) failed
        fail(trainer.epoch, str(exc))
        return
    if result.status == "diverged":
        fail(result.epochs_completed, f"diverged: {result.message}")


def _trial_storage() -> str:
    """Where Tune keeps this trial's checkpoints (its directory in the storage path), for messages."""
    import ray.tune

    context = ray.tune.get_context()
    try:
        return context.get_storage().trial_fs_path
    except Exception:  # a DeveloperAPI: fall back to the trial's local directory
        return context.get_trial_dir() or "the storage path"


def restore(trainer, checkpoint, report: RayReporter) -> None:
    """Load the trial's latest checkpoint into `trainer`; if it is damaged (`ssl_tune.trials.checkpoints`), name it
    (printed, and sent as DAMAGED_CHECKPOINT_KEY for the run's tags) and fall back to the one before it
    (two are kept). Raises CheckpointError, naming the latest, when none of them loads."""
    damaged: list[str] = []
    for candidate in [checkpoint, *_earlier_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as directory:
                trainer.load_checkpoint(Path(directory))
        except CheckpointError as exc:
            damaged.append(f"checkpoint {candidate.path}: {exc.reason}")  # the stored path, not a download's
            print(f"warning: {damaged[-1]}", flush=True)
            continue
        if damaged:
            print(f"continuing from the earlier checkpoint {candidate.path} (epoch {trainer.epoch})", flush=True)
            report.once[DAMAGED_CHECKPOINT_KEY] = "; ".join(damaged)[:5000]
        return
    raise CheckpointError(checkpoint.path, "; ".join(damaged)[:2000].removeprefix(f"checkpoint {checkpoint.path}: "))


def _earlier_checkpoints(checkpoint) -> list:
    """The checkpoints kept beside `checkpoint` (Tune's checkpoint_NNNNNN, Ray Train's dated names), newest first."""
    import pyarrow.fs
    import ray.tune

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name != name), reverse=True)
    return [ray.tune.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names if n < name]


def run_trial(config: dict[str, Any], base_spec: dict[str, Any], data_fingerprint: str | None = None,
              record: dict[str, str] | None = None) -> None:
    """Tune function trainable: `config` holds the sampled values by Optuna name, or a confirmation's values and seed."""
    import ray.tune

    spec = resolve_trial(spec_model().model_validate(base_spec), config)
    payload = {"spec": spec.model_dump(mode="json"), "data_fingerprint": data_fingerprint,
               "record": record and {**record, "trial_id": ray.tune.get_context().get_trial_id()}}
    r = spec.resources
    if r.num_workers == 1:
        train_worker({**payload, "via": "tune"})
        return
    context = ray.tune.get_context()
    name = f"train-{context.get_trial_id()}"
    # The placement-group record stays in the trial's local directory on this node; the checkpoints go
    # to the search's storage path (every node reaches it, and it outlives this Ray session).
    run_dir = Path(context.get_trial_dir()).parent / name
    if remove_leftover_placement_groups(run_dir):  # left by an attempt that died with its node
        print(f"removed placement groups left behind by an earlier attempt of trial {context.get_trial_id()}")
    try:
        _fit_train_run(spec, payload, name, run_dir, context.get_storage())
    except Exception as exc:
        out_of_memory = rank_failure(exc, DeviceOutOfMemory)
        if out_of_memory is None:
            raise  # Tune restarts the trial (search.max_failures)
        # A worker ran out of device memory: deterministic, so the trial ends failed instead of restarting.
        ray.tune.report({spec.search.metric: math.nan, FAILURE_KEY: str(out_of_memory)[:2000]})
    finally:
        remove_leftover_placement_groups(run_dir)


def rank_failure(exc: BaseException, kind: type[E]) -> E | None:
    """The first rank's exception of type `kind` in a failed Ray Train run (`WorkerGroupError.worker_failures`:
    each rank's exception travels back with it), or None: recognised by its type, not by its message."""
    for failure in getattr(exc, "worker_failures", {}).values():
        # Ray Train wraps a rank's exception with its traceback's text (UserExceptionWithTraceback) and keeps it.
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, kind):
            return cause
    return None


def _fit_train_run(spec: SpecBase, payload: dict[str, Any], name: str, run_dir: Path, storage) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = spec.resources
    gpus = r.gpus_per_worker
    if gpus == "auto":  # (the driver resolves it before any trial: `cluster.resolve_gpus`)
        raise ValueError("resources.gpus_per_worker is still 'auto' in a trial")
    TorchTrainer(
        train_worker,
        train_loop_config={**payload, "via": "train", "run_dir": str(run_dir),
                           "checkpoints_in": f"{storage.experiment_fs_path}/{name}"},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=gpus > 0, placement_strategy=r.placement_strategy,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,  # fixed per trial: a retried or resumed trial finds its checkpoints
            storage_path=storage.experiment_fs_path, storage_filesystem=storage.storage_filesystem,
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # Ray's own callback; its stubs name another base
            checkpoint_config=checkpoint_config(train=True),
            # A dead worker or node, or workers that cannot be placed within the worker-group start
            # timeout: the run fails at once and Tune restarts the trial (search.max_failures) from
            # the latest checkpoint, the same way as a single-worker trial. The restart is then
            # visible (console, MLflow), and leftover placement groups are removed in between.
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),  # type: ignore[call-arg]  # Train's own takes it; the stubs describe Tune's
        ),
    ).fit()


# Checkpoints kept per trial: the latest, which the objective was measured on (its last evaluated epoch,
# `ssl_tune.searching.space`) and a restarted trial continues from, and the one before, should the latest be damaged.
CHECKPOINTS_KEPT = 2


def checkpoint_config(*, train: bool):
    """Keep `CHECKPOINTS_KEPT` checkpoints per trial, the same for one-worker (Tune) and multi-worker (Ray Train) trials."""
    import ray.train
    import ray.tune

    cls = ray.train.CheckpointConfig if train else ray.tune.CheckpointConfig
    return cls(num_to_keep=CHECKPOINTS_KEPT)


def error_text(trial) -> str:
    """The trial's error as Tune wrote it, the exception with its traceback, without colour codes."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        return ""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def error_summary(trial) -> str:
    """One line saying why a trial failed or is being restarted."""
    return last_line(error_text(trial))[:300]


def last_line(text: str) -> str:
    """The exception line of a traceback, for the run's tag."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "trial failed")[:5000]
