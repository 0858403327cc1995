"""Export the best trial of a search, and load an exported backbone for downstream work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import nn

from ssl_tune import tracking
from ssl_tune.preprocess import InputContract, Preprocess
from trainers import spec_model

BACKBONE_FILE = "backbone.pt"
HEAD_FILE = "head.pt"
SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.json"
INPUT_FILE = "input.json"
# The registered model's MLflow metadata key for its input contract.
INPUT_METADATA_KEY = "ssl_tune_input"


class Pretrained(NamedTuple):
    """A loaded backbone and the transform that makes its input: `backbone(preprocess(image))`."""

    backbone: nn.Module
    preprocess: Preprocess


def _checkpoint_state(path: Path) -> dict:
    from ssl_tune import checkpoints

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
    """Write backbone.pt, head.pt, spec.yaml, input.json and metrics.json of the best checkpoint into `out`.

    With `register`, the backbone is also logged to the trial's MLflow run and registered under that name.
    """
    from trainers.loop import build_method

    client = tracking.existing_store_client(uri)
    run = best_trial_run(client, experiment_or_run)
    with tracking.checkpoint_of(client, run) as directory:
        state = _checkpoint_state(directory)
        checkpoint = run.data.tags.get(tracking.TAG_CHECKPOINT) or str(directory)
    contract = input_contract(state, f"the checkpoint of run {run.info.run_id}")
    spec = spec_model().model_validate(state["spec"])
    method = build_method(spec, in_channels=_in_channels(state["model"]))
    method.load_state_dict(state["model"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(method.backbone.state_dict(), out / BACKBONE_FILE)
    torch.save({k: v for k, v in method.state_dict().items() if not k.startswith("backbone.")}, out / HEAD_FILE)
    (out / SPEC_FILE).write_text(yaml.safe_dump(state["spec"], sort_keys=False))
    (out / INPUT_FILE).write_text(json.dumps(contract.to_dict(), indent=2))
    epoch = state["epoch"]
    metrics = next((h for h in state["history"] if int(h["epoch"]) == epoch), {})
    (out / METRICS_FILE).write_text(json.dumps({"run_id": run.info.run_id, "checkpoint": checkpoint, "epoch": epoch,
                                               "metrics": metrics}, indent=2))
    if register:
        import mlflow

        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pytorch.log_model(method.backbone, name="backbone", serialization_format="pickle",
                                            registered_model_name=register,
                                            metadata={INPUT_METADATA_KEY: contract.to_dict()})
        (out / "registered_model.txt").write_text(f"{register}\n{info.model_uri}\n")
    return out


def _in_channels(state: dict, prefix: str = "backbone.") -> int:
    """Input channels of a backbone, read off its first convolution's weight."""
    return next(v for k, v in state.items() if k.startswith(prefix) and v.ndim == 4).shape[1]


def load_backbone(path_or_run: str | Path, *, tracking_uri: str | None = None) -> Pretrained:
    """The pretrained backbone (in eval mode) and its `preprocess` transform, from an export directory, a
    checkpoint, an MLflow run or a registered model.

    `path_or_run` is a directory written by `ssl-tune export`, a `checkpoint.pt` (or its directory),
    an MLflow run id / search name / experiment name (the best trial's checkpoint, from Ray's storage
    when this machine sees it, else from the run's artifacts), or `models:/NAME/VERSION`. Raises
    `LookupError` with one line saying what was tried when it is none of these.
    """
    from ssl_tune.models import build_backbone

    if str(path_or_run).startswith("models:/"):  # a version registered by `ssl-tune export --register`
        return _registered(str(path_or_run), tracking.resolve_uri(tracking_uri))
    path = Path(path_or_run)
    if (path / BACKBONE_FILE).exists():
        spec = spec_model().model_validate(yaml.safe_load((path / SPEC_FILE).read_text()))
        weights = torch.load(path / BACKBONE_FILE, map_location="cpu", weights_only=True)
        if not (path / INPUT_FILE).exists():
            raise LookupError(f"{path} has no {INPUT_FILE} (the backbone's input contract): it was exported by an older "
                              "ssl-tune; export it again")
        contract = InputContract.from_dict(json.loads((path / INPUT_FILE).read_text()))
    else:
        if path.is_file() or (path / "checkpoint.pt").is_file():
            state, where = _checkpoint_state(path), str(path)
        elif path.exists():
            raise LookupError(f"{path} is neither an export directory (no {BACKBONE_FILE}) nor a checkpoint "
                              "(no checkpoint.pt)")
        else:  # a run id or experiment: the best checkpoint, from Ray's storage or the run's artifacts
            state, where = _state_from_tracking(str(path_or_run), tracking.resolve_uri(tracking_uri))
        contract = input_contract(state, where)
        spec = spec_model().model_validate(state["spec"])
        weights = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    b = spec.backbone
    # Plain torch modules: GlobalBatchNorm's state has the same keys as BatchNorm's.
    backbone = build_backbone(b.name, _in_channels(weights, prefix=""), width=b.width, cifar_stem=b.cifar_stem)
    backbone.load_state_dict(weights)
    return Pretrained(backbone.eval(), Preprocess(contract))


def _state_from_tracking(name: str, uri: str) -> tuple[dict, str]:
    """The checkpoint of the run, search or experiment `name`; LookupError saying everything that was tried."""
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
        return _checkpoint_state(directory), f"the checkpoint of run {run.info.run_id}"


def _registered(uri_of_model: str, uri: str) -> Pretrained:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.existing_store_client(uri)  # LookupError naming a missing store; MLflow would create one
    mlflow.set_tracking_uri(uri)
    try:
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
