"""Spec files: a typed schema for what to train and which hyperparameters to search.

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
`ssl_tune.specfile.load_spec` reads and validates files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field, field_validator, model_validator

from ssl_tune.data.datasets import DATASET_NAMES, NEEDS_ROOT

# The ranges are part of the schema: `from ssl_tune.spec import Choice` is how the rest of the package names them.
from ssl_tune.ranges import (RANGE_TYPES, Choice, IntRange, LogUniform, Searchable, SpecError,  # noqa: F401
                             StrictModel, Uniform, range_default, set_path)
# The search section: `from ssl_tune.spec import OBJECTIVES` is how the rest of the package names it.
from ssl_tune.search_spec import (OBJECTIVES, SAMPLERS, ConfirmSpec, SearchSpec,  # noqa: F401
                                  check_confirm_overrides, confirmation_spec)

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

    name: Choice  # type: ignore[assignment]


Probability = Annotated[float, Field(ge=0, le=1)]


class ViewStrengths(StrictModel):
    """What a preset may set differently per view (BYOL's asymmetric pair); null: the preset's value."""

    blur_p: Searchable[Optional[Probability]] = Field(
        None, description="probability of the Gaussian blur (byol: 1.0 in view 1, 0.1 in view 2; symmetric: 0.5)")
    solarize_p: Searchable[Optional[Probability]] = Field(
        None, description="probability of solarisation (byol: 0.0 in view 1, 0.2 in view 2; symmetric: 0.1)")


class AugmentationSpec(StrictModel):
    """A preset and the strengths a search may change; every strength left null keeps the preset's value."""

    preset: Literal["byol", "symmetric", "weak"] = Field(
        "byol",
        description="byol: asymmetric blur/solarize per view (BYOL, VICReg); symmetric: the same "
        "strong pipeline for every view; weak: crop and flip only",
    )
    crop_min_scale: Searchable[Annotated[float, Field(gt=0, le=1)]] = Field(
        0.2, description="lower bound of the random resized crop's area, a fraction of the image")
    crop_max_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="upper bound of the random resized crop's area")
    jitter_strength: Searchable[Optional[Annotated[float, Field(ge=0)]]] = Field(
        None, description="colour-jitter strength s (SimCLR's): brightness and contrast 0.4 s, saturation 0.2 s, "
        "hue 0.1 s (at most 0.5); the strong presets use 1")
    jitter_p: Searchable[Optional[Probability]] = Field(None, description="probability of the colour jitter (presets: 0.8)")
    grayscale_p: Searchable[Optional[Probability]] = Field(None, description="probability of grayscale (presets: 0.2)")
    blur_sigma: Optional[tuple[float, float]] = Field(
        None, description="blur sigma range as a fraction of the image side; null: BYOL's 0.1 to 2.0 px at 224 px")
    view1: ViewStrengths = ViewStrengths()
    view2: ViewStrengths = ViewStrengths()  # and any further views

    @model_validator(mode="before")
    @classmethod
    def _stored_crop_scale(cls, data: Any) -> Any:
        """Specs saved before the crop's bounds became two fields (in checkpoints, exports, MLflow runs)
        name them `crop_scale: [low, high]`; they still load."""
        if isinstance(data, dict) and "crop_scale" in data:
            data = dict(data)
            if "crop_min_scale" in data or "crop_max_scale" in data:
                raise ValueError("crop_scale is the older name of crop_min_scale and crop_max_scale; give only those")
            data["crop_min_scale"], data["crop_max_scale"] = data.pop("crop_scale")
        return data

    @field_validator("blur_sigma")
    @classmethod
    def _sigma(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("must satisfy 0 < low <= high")
        return v

    @model_validator(mode="after")
    def _crop_bounds(self) -> AugmentationSpec:
        low = self.crop_min_scale
        if isinstance(low, float) and low > self.crop_max_scale:
            raise ValueError(f"crop_min_scale ({low}) must not exceed crop_max_scale ({self.crop_max_scale})")
        return self


# data.on_device: auto keeps the training images resident on a GPU when they take at most this fraction
# of its free memory at start (the rest is the model's, the activations' and the evaluation's).
RESIDENT_FRACTION = 0.25

# The cache holds every image at data.image_size (3 x S x S bytes each): at 1024 px, 3 MiB an image and
# 3.8 TiB for ImageNet-1k. SSL backbones take 224 px (DINOv2's largest 518); beyond 1024 a typo is likelier.
MAX_IMAGE_SIZE = 1024
MAX_CACHE_SIZE = 1280


class DataSpec(StrictModel):
    name: Literal[DATASET_NAMES] = "fashion_mnist_subset"  # type: ignore[valid-type]
    root: Path | None = Field(None, description="data root; required for cifar10, cifar100, stl10, imagefolder")
    image_size: int | None = Field(None, ge=8, description="imagefolder only: images are resized to this size (64 if null), "
                                   f"at most {MAX_IMAGE_SIZE}")
    cache_size: int | None = Field(None, description="imagefolder only: the square each whole picture is stored in "
                                   "(its aspect ratio recorded), at least image_size; null: 1.15 x image_size")
    cache_dir: Path | None = Field(None, description="where decoded data sets are cached; null: $SSL_TUNE_CACHE_DIR, "
                                   "else ~/.cache/ssl-tune. On a cluster, a node-local disk")
    skip_corrupt: bool = Field(False, description="imagefolder: leave out images that do not decode (counted, "
                               "printed, logged) instead of stopping")
    on_device: Literal["auto"] | bool = Field(
        "auto", description="keep the training images in each GPU's memory (true), or stream each rank's rows of "
        "every batch from the node's cache through pinned memory (false); auto: resident when they take at most "
        f"{int(RESIDENT_FRACTION * 100)}% of the GPU's free memory, streamed on a CPU")
    subset: Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="train on part of the training images: a count (20000) or a fraction (0.25), stratified by "
        "class and the same for every trial (`data.subset_seed`); the kNN bank is drawn from it. With "
        "`search.confirm.overrides: {data.subset: null}`, a cheap proxy for the search; null: all images")
    subset_seed: int = Field(0, description="which images `data.subset` takes")
    augmentation: AugmentationSpec = AugmentationSpec()

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int | None) -> int | None:
        if v is not None and v > MAX_IMAGE_SIZE:
            raise ValueError(f"at most {MAX_IMAGE_SIZE} px: the cache stores every image at this size (3 x S x S "
                             f"bytes; {v} px is {3 * v * v / 2**20:,.0f} MiB an image), and SSL backbones take 224 px")
        return v

    @model_validator(mode="after")
    def _cache_size(self) -> DataSpec:
        if self.cache_size is not None and not (self.image_size or 64) <= self.cache_size <= MAX_CACHE_SIZE:
            raise ValueError(f"data.cache_size ({self.cache_size}) must be at least data.image_size "
                             f"({self.image_size or 64}: crops are cut from it) and at most {MAX_CACHE_SIZE}")
        return self

    @model_validator(mode="after")
    def _root(self) -> DataSpec:
        if self.name in NEEDS_ROOT and self.root is None:
            raise ValueError(f"data set {self.name!r} needs data.root (a directory holding it); nothing is downloaded")
        # Fields a data set would ignore are refused: a setting that silently does nothing misleads.
        if self.name != "imagefolder":
            ignored = [f for f in ("image_size", "cache_size", "skip_corrupt") if getattr(self, f) not in (None, False)]
            if self.name == "fashion_mnist_subset" and self.root is not None:
                ignored.append("root")
            if ignored:
                raise ValueError(f"data set {self.name!r} ignores data.{', data.'.join(ignored)} (only imagefolder "
                                 "resizes and skips corrupt files; the bundled set ships inside the package): remove "
                                 f"{'it' if len(ignored) == 1 else 'them'}")
        if self.root is not None:
            if not self.root.is_dir():
                raise ValueError(f"data.root {str(self.root)!r} is not an existing directory")
            self.root = self.root.resolve()  # trials run in other working directories
        if self.cache_dir is not None:
            self.cache_dir = self.cache_dir.expanduser().resolve()
        return self


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
        name = self.method.name  # type: ignore[attr-defined]
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
