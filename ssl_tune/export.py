"""Export the best trial of a search, and load an exported backbone for downstream work."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import nn

from ssl_tune import tracking
from ssl_tune.trials.checkpoints import BACKBONE_FILE, EXPORT_FILES, INPUT_FILE, METRICS_FILE, SPEC_FILE, write_export
from ssl_tune.preprocess import InputContract, Preprocess
from trainers import spec_model

# The registered model's MLflow metadata key for its input contract.
INPUT_METADATA_KEY = "ssl_tune_input"


class Pretrained(NamedTuple):
    """A loaded backbone and the transform that makes its input: `backbone(preprocess(image))`."""

    backbone: nn.Module
    preprocess: Preprocess


def _checkpoint_state(path: Path) -> dict:
    from ssl_tune.trials import checkpoints

    return checkpoints.load(path)  # verified: a damaged file is named with its reason


def input_contract(state: dict, where: str) -> InputContract:
    """The input contract a checkpoint carries (`trainers.loop.Trainer.input_contract`)."""
    if "input" not in state:
        raise LookupError(f"{where} has no input contract (channels, size, normalisation): it was written by an "
                          "older ssl-tune; train it again")
    return InputContract.from_dict(state["input"])


def best_trial_run(client, experiment_or_run: str):
    """The trial run to export: the given trial (or confirmation run), or the given search's best:
    its confirmed winner's best seed after a confirmation stage, else its best trial."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(experiment_or_run)
    except MlflowException:
        run = None  # not a run id: an experiment name
    if run is not None and run.data.tags.get(tracking.TAG_KIND) in (tracking.KIND_TRIAL, tracking.KIND_CONFIRMATION):
        return run
    parent = tracking.find_parent_run(client, experiment_or_run)
    best_id = tracking.best_trial_run_id(client, parent)
    if best_id is None:
        raise LookupError(f"search {parent.info.run_id} has no trial with a result yet (failed trials do not count)")
    return client.get_run(best_id)


def export_run(uri: str, experiment_or_run: str, out: Path, register: str | None = None) -> Path:
    """Write backbone.pt, head.pt, spec.yaml, input.json and metrics.json of the best checkpoint into `out`:
    from the full checkpoint in Ray's storage where this machine sees it, else the export the trial uploaded
    to its run's artifacts.

    With `register`, the backbone is also logged to the trial's MLflow run and registered under that name.
    """
    import shutil

    client = tracking.existing_store_client(uri)
    run = best_trial_run(client, experiment_or_run)
    about = {"run_id": run.info.run_id}
    with tracking.checkpoint_of(client, run) as directory:
        if (directory / BACKBONE_FILE).exists():  # the trial's own export, from its artifacts
            out.mkdir(parents=True, exist_ok=True)
            for name in EXPORT_FILES:
                shutil.copyfile(directory / name, out / name)
            recorded = json.loads((out / METRICS_FILE).read_text())
            about["checkpoint"] = f"{run.info.artifact_uri}/{run.data.tags[tracking.TAG_CHECKPOINT_ARTIFACT]}"
            (out / METRICS_FILE).write_text(json.dumps({**recorded, **about}, indent=2))
        else:
            state = _checkpoint_state(directory)
            input_contract(state, f"the checkpoint of run {run.info.run_id}")
            about["checkpoint"] = run.data.tags.get(tracking.TAG_CHECKPOINT) or str(directory)
            write_export(out, state, **about)
    if register:
        import mlflow

        contract = InputContract.from_dict(json.loads((out / INPUT_FILE).read_text()))
        with tracking.fluent_tracking_uri(uri), mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pytorch.log_model(load_backbone(out).backbone, name="backbone", serialization_format="pickle",
                                            registered_model_name=register,
                                            metadata={INPUT_METADATA_KEY: contract.to_dict()})
        (out / "registered_model.txt").write_text(f"{register}\n{info.model_uri}\n")
    return out


def load_backbone(path_or_run: str | Path, *, tracking_uri: str | None = None) -> Pretrained:
    """The pretrained backbone (in eval mode) and its `preprocess` transform, from an export directory, a
    checkpoint, an MLflow run or a registered model.

    `path_or_run` is a directory written by `ssl-tune export`, a `checkpoint.pt` (or its directory),
    an MLflow run id / search name / experiment name (the best trial's checkpoint, from Ray's storage
    when this machine sees it, else from the run's artifacts), or `models:/NAME/VERSION`. Raises
    `LookupError` with one line saying what was tried when it is none of these.
    """
    from ssl_tune.models import backbone_from_spec

    if str(path_or_run).startswith("models:/"):  # a version registered by `ssl-tune export --register`
        return _registered(str(path_or_run), tracking.resolve_uri(tracking_uri))
    path = Path(path_or_run)
    if not path.exists():
        # a run id, search or experiment: the best trial's checkpoint in Ray's storage, else its uploaded export
        with _tracked_directory(str(path_or_run), tracking.resolve_uri(tracking_uri)) as directory:
            return load_backbone(directory)
    if (path / BACKBONE_FILE).exists():
        spec = spec_model().model_validate(yaml.safe_load((path / SPEC_FILE).read_text()))
        weights = torch.load(path / BACKBONE_FILE, map_location="cpu", weights_only=True)
        if not (path / INPUT_FILE).exists():
            raise LookupError(f"{path} has no {INPUT_FILE} (the backbone's input contract): it was exported by an older "
                              "ssl-tune; export it again")
        contract = InputContract.from_dict(json.loads((path / INPUT_FILE).read_text()))
    else:
        if not (path.is_file() or (path / "checkpoint.pt").is_file()):
            raise LookupError(f"{path} is neither an export directory (no {BACKBONE_FILE}) nor a checkpoint "
                              "(no checkpoint.pt)")
        state, where = _checkpoint_state(path), str(path)
        contract = input_contract(state, where)
        spec = spec_model().model_validate(state["spec"])
        weights = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    # Plain torch modules: GlobalBatchNorm's state has the same keys as BatchNorm's.
    backbone = backbone_from_spec(spec.backbone, contract.channels, contract.image_size)
    backbone.load_state_dict(weights)
    return Pretrained(backbone.eval(), Preprocess(contract))


@contextlib.contextmanager
def _tracked_directory(name: str, uri: str):
    """The checkpoint (or uploaded export) directory of the run, search or experiment `name`; LookupError
    saying everything that was tried."""
    try:
        client = tracking.existing_store_client(uri)
        run = best_trial_run(client, name)
    except LookupError as exc:
        reason = str(exc).splitlines()[0].split("; ")[0]
        store = reason if uri in reason else f"{reason} in the tracking store {uri}"
        raise LookupError(f"no backbone {name!r}: no export directory or checkpoint {Path(name).resolve()}; "
                          f"not a run id, search or experiment ({store}); not a registered model "
                          "(models:/NAME/VERSION)") from None
    with tracking.checkpoint_of(client, run) as directory:
        yield directory


def _registered(uri_of_model: str, uri: str) -> Pretrained:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.existing_store_client(uri)  # LookupError naming a missing store; MLflow would create one
    try:
        with tracking.fluent_tracking_uri(uri):
            info = mlflow.models.get_model_info(uri_of_model)
            backbone = mlflow.pytorch.load_model(uri_of_model, map_location="cpu")
    except MlflowException as exc:
        raise LookupError(f"no registered model {uri_of_model} in the tracking store {uri} "
                          f"({str(exc).splitlines()[0]})") from None
    contract = (info.metadata or {}).get(INPUT_METADATA_KEY)
    if contract is None:
        raise LookupError(f"{uri_of_model} has no input contract in its metadata: it was not registered by "
                          "`ssl-tune export --register`")
    return Pretrained(backbone.eval(), Preprocess(InputContract.from_dict(contract)))
