"""The schema's sections and the whole spec (`SpecBase`): what to train and which hyperparameters to search.

A spec is YAML. Any field typed ``Searchable[...]`` holds either a fixed value or a search
range, written as a mapping with a ``type`` key::

    lr: 0.3                                            # fixed
    lr: {type: loguniform, low: 0.05, high: 1.0}       # searched
    lam1: {type: uniform, low: -0.5, high: 0.5, default: 0.0}
    output_dim: {type: int, low: 64, high: 512, step: 64}
    name: {type: choice, values: [sgd, lars]}

``SpecBase.resolve`` turns a spec with ranges into one with fixed values, from a search's sample
or the ranges' defaults. This module knows no method: each method's config subclasses
`MethodConfig`, `trainers.spec_model` adds the ``method`` field over every method, and
`ssl_tune.spec.files.load_spec` reads and validates files.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator


from ssl_tune.spec.data import AugmentationSpec, DataSpec  # noqa: F401
from ssl_tune.spec.ranges import (RANGE_TYPES, Choice, IntRange, LogUniform, Searchable, SpecError, StrictModel,  # noqa: F401
                                  Uniform, range_default, set_path)
from ssl_tune.spec.search import ConfirmSpec, SearchSpec, check_confirm_overrides, confirmation_spec  # noqa: F401

# --- sections ------------------------------------------------------------------------------


class MethodConfig(StrictModel):
    """Base for a method's hyperparameters; each method module subclasses it with `name`."""

    name: str

    def check_spec(self, spec: SpecBase) -> None:
        """Raise ValueError if these hyperparameters do not fit the rest of the spec.

        Runs on specs that may still hold search ranges; check fields that cannot.
        """


class MethodChoice(MethodConfig):
    """`method.name` as a choice over methods: a search across methods. Each branch holds that method's
    own ranges (`method.FIELD`); its other fields take their defaults. `trainers.spec_model` accepts
    it wherever a method's config goes."""

    name: Choice  # type: ignore[assignment]  # the one config whose name is a range: a choice over methods


class BackboneSpec(StrictModel):
    name: str = Field("small_cnn", description="small_cnn, any torchvision classification model (resnet50, vit_b_16, "
                      "convnext_tiny, ...) or timm:NAME (timm:vit_small_patch16_224); random weights")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model's constructor, e.g. "
                                   "{img_size: 32, patch_size: 4} for a timm ViT on 32-px images")
    width: int = Field(32, ge=4, description="small_cnn: channels of the first block (doubled per block)")
    cifar_stem: Literal["auto"] | bool = Field(
        "auto", description="torchvision ResNets: 3x3 stride-1 first conv and no max-pool; auto: for inputs up to 64 px")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from ssl_tune.models import check_name

        check_name(name)
        return name

    @model_validator(mode="after")
    def _stem_fits(self) -> BackboneSpec:
        from ssl_tune.models import is_resnet

        # (small_cnn ignores it: specs written when true was the default still load)
        if self.cifar_stem is True and not is_resnet(self.name) and self.name != "small_cnn":
            raise ValueError(f"backbone.cifar_stem: true applies to torchvision ResNets only, not {self.name!r}; "
                             "use auto or false")
        return self


class ProjectorSpec(StrictModel):
    hidden_dim: Searchable[Annotated[int, Field(ge=1)]] = 512
    output_dim: Searchable[Annotated[int, Field(ge=1)]] = 256
    num_layers: Searchable[Annotated[int, Field(ge=1)]] = 3


class OptimizerSpec(StrictModel):
    name: Searchable[Literal["sgd", "lars", "adamw"]] = "lars"
    lr: Searchable[Annotated[float, Field(gt=0)]] = 0.5
    weight_decay: Searchable[Annotated[float, Field(ge=0)]] = 1e-5
    momentum: Searchable[Annotated[float, Field(ge=0, lt=1)]] = 0.9
    warmup_epochs: Searchable[Annotated[float, Field(ge=0)]] = 1.0
    final_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0


class TrainingSpec(StrictModel):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=2, description="global batch size (all workers together)")] = 256
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto", description="convolutions in the channels-last memory layout; auto: on CUDA (tensor cores)")
    checkpoint_every: Annotated[int, Field(ge=1)] = Field(
        1, description="epochs between checkpoints; the last epoch and ASHA's decision epochs always get one. A "
        "restarted trial goes back to its latest checkpoint")


# Evaluation's cap on labelled training images, RankMe's sample size (`ssl_tune.evaluation.RANKME_SAMPLES`):
# all of the bundled set's 10,000; 25 per class of ImageNet-1k, where the whole split made each evaluation
# a third of a training epoch. On 100,000 images at 96 px it keeps an evaluation under a tenth of an
# epoch on a CPU (docs/benchmarks.md, data), and it ranks a search's trials as the whole split does (knn-bank).
DEFAULT_BANK_SIZE = 25_600


class EvaluationSpec(StrictModel):
    eval_every: Annotated[int, Field(ge=1)] = Field(
        1, description="epochs between evaluations (and the last epoch); ASHA decides at evaluated epochs only")
    bank_size: Annotated[int, Field(ge=1)] | None = Field(
        DEFAULT_BANK_SIZE, description="labelled training images evaluation uses (kNN bank, linear probes, label "
        "fractions): a stratified subset, the same for every trial and epoch; null: all of them")
    batch_size: Annotated[int, Field(ge=1)] = Field(512, description="images per batch of feature extraction")
    knn_k: Annotated[int, Field(ge=1)] = 20
    knn_temperature: Annotated[float, Field(gt=0)] = 0.07
    linear_probe: bool = True
    linear_probe_epochs: Annotated[int, Field(ge=1)] = 100
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=list, description="e.g. [0.01, 0.1]: linear probes on these fractions of the labels"
    )


class ResourcesSpec(StrictModel):
    num_workers: Annotated[int, Field(ge=1)] = Field(1, description="DDP workers per trial")
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Literal["auto"] | Annotated[float, Field(ge=0)] = Field(
        "auto", description="auto: 1 where the Ray cluster has GPUs, else 0. A fraction (one worker per trial only) "
        "packs several trials on one GPU")
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Ray placement of one trial's workers: PACK onto few nodes, or SPREAD over nodes")

    @model_validator(mode="after")
    def _gpus_not_shared_by_ranks(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if g == "auto" or g == 0:
            return self
        if g > 1 and g != int(g):
            raise ValueError(f"resources.gpus_per_worker {g:g}: above 1 it must be a whole number of GPUs")
        if g < 1 and self.num_workers > 1:
            # Ray would put two ranks of one trial on one GPU, which NCCL refuses ("Duplicate GPU detected").
            raise ValueError(f"resources.gpus_per_worker {g:g} with resources.num_workers {self.num_workers}: ranks of "
                             "one trial cannot share a GPU; use 1 GPU per worker, or one worker per trial to pack trials")
        return self


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment_name: str | None = Field(None, description="default: the spec's name")


class SpecBase(StrictModel):
    """Everything but the method; `trainers.spec_model()` adds the method union."""

    if TYPE_CHECKING:  # the field `trainers.spec_model()` adds: one method's config, or a choice over methods
        method: MethodConfig
    name: str = Field("ssl-tune", description="experiment name")
    data: DataSpec = DataSpec()
    backbone: BackboneSpec = BackboneSpec()
    projector: ProjectorSpec = ProjectorSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    search: SearchSpec = SearchSpec()
    resources: ResourcesSpec = ResourcesSpec()
    mlflow: MlflowSpec = MlflowSpec()
    storage_path: str = Field("ssl_tune_runs", description="where Ray keeps trial results and checkpoints")

    @model_validator(mode="after")
    def _method_fits(self) -> SpecBase:
        method = getattr(self, "method", None)  # the field is added by trainers.spec_model()
        if method is not None:
            method.check_spec(self)
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> SpecBase:
        if self.training.batch_size % self.resources.num_workers:
            raise ValueError(f"training.batch_size ({self.training.batch_size}) must be divisible by "
                             f"resources.num_workers ({self.resources.num_workers}): it is the global batch")
        return self

    @model_validator(mode="after")
    def _confirm_overrides(self) -> SpecBase:
        check_confirm_overrides(self)
        return self

    def confirmation_spec(self) -> SpecBase:
        """The spec the confirmation trials train (the default's too): this one with `search.confirm.overrides`
        set, its ranges kept; itself without overrides."""
        return confirmation_spec(self)

    # --- searchable fields ---

    def search_ranges(self) -> dict[str, Uniform | LogUniform | IntRange | Choice]:
        """Dotted path -> range, for every field that holds a search range."""
        found: dict[str, Any] = {}

        def walk(model: BaseModel, prefix: str) -> None:
            for key in type(model).model_fields:
                value = getattr(model, key)
                path = f"{prefix}{key}"
                if isinstance(value, RANGE_TYPES):
                    found[path] = value
                elif isinstance(value, BaseModel):
                    walk(value, path + ".")

        walk(self, "")
        return found

    def branch_ranges(self) -> dict[tuple[str, str], dict[str, Uniform | LogUniform | IntRange | Choice]]:
        """(choice path, value as text) -> {field path: range} for every conditional branch."""
        return {(path, value): branch for path, r in self.search_ranges().items() if isinstance(r, Choice)
                for value, branch in r.branches.items()}

    def searchable_paths(self) -> list[str]:
        """Every path a search may set: the ranges and the fields of their branches."""
        paths = list(self.search_ranges())
        for branch in self.branch_ranges().values():
            paths += [p for p in branch if p not in paths]
        return paths

    def resolve(self, values: dict[str, Any] | None = None) -> SpecBase:
        """A copy with every range replaced: by `values[path]` when given, else its default.

        A branch's fields take their sampled (or default) value only when the branch's choice is
        taken; otherwise they keep the fixed value written in the spec.
        """
        values = values or {}
        unknown = set(values) - set(self.searchable_paths())
        if unknown:
            raise SpecError(f"not searchable in this spec: {', '.join(sorted(unknown))}")
        raw = self.model_dump(mode="json")
        chosen = {}
        for path, r in self.search_ranges().items():
            chosen[path] = values.get(path, range_default(r))
            set_path(raw, path.split("."), chosen[path])
        for (path, value), branch in self.branch_ranges().items():
            if str(chosen[path]) == value:
                for sub_path, r in branch.items():
                    set_path(raw, sub_path.split("."), values.get(sub_path, range_default(r)))
        return type(self).model_validate(raw)

    def method_names(self) -> list[str]:
        """The methods this spec trains: its one method, or the values of a choice over methods."""
        name = self.method.name  # type: ignore[attr-defined]  # the field `trainers.spec_model` adds
        return [str(v) for v in name.values] if isinstance(name, Choice) else [name]

    @property
    def is_resolved(self) -> bool:
        return not self.search_ranges()

    def flat(self) -> dict[str, Any]:
        """Dotted path -> value for every leaf field (for logging as params)."""
        out: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict) and "type" not in node:
                for k, v in node.items():
                    walk(v, f"{prefix}{k}.")
            else:
                out[prefix[:-1]] = node

        walk(self.model_dump(mode="json"), "")
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]
