"""The spec's data section (`DataSpec`) and its view augmentations (`AugmentationSpec`): which images, where
they are cached, how a trial reads them, and how its two views are drawn. `ssl_tune.spec` names them with the
rest of the schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ssl_tune.data.datasets import DATASET_NAMES, NEEDS_ROOT
from ssl_tune.spec.ranges import Searchable, StrictModel


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
    name: Literal[DATASET_NAMES] = "fashion_mnist_subset"  # type: ignore[valid-type]  # a tuple's values
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
