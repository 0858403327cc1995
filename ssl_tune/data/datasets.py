"""Image data sets: every split is a uint8 tensor N x C x H x W plus int64 labels.

Nothing is downloaded. The default data set is a Fashion-MNIST subset shipped inside the
package; the others are read from a root the user gives, in their official on-disk formats (CIFAR
and STL-10 through torchvision's readers, which check the published checksums first), and kept in a
decoded cache (`ssl_tune.data.cache`) that trials memory-map.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FILE = "fashion_mnist_subset.npz"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
DATASET_NAMES = ("fashion_mnist_subset", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")
# Data sets that cannot be found without a user-given root.
NEEDS_ROOT = ("cifar10", "cifar100", "stl10", "imagefolder")


class DataError(ValueError):
    """A data root that is missing or not in the expected format."""


@dataclass(frozen=True)
class ImageDataset:
    """Train/test splits held in memory; `pretrain_images` may add unlabelled images (STL-10)."""

    name: str
    train_images: torch.Tensor  # uint8, N x C x H x W
    train_labels: torch.Tensor  # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    pretrain_images: torch.Tensor | None = None
    channel_stats: tuple[list[float], list[float]] | None = None  # train images' mean and std, when known
    # An image-folder cache stores each whole picture resized to a square larger than the network's input
    # (`data.cache_size`), with its original width / height per split; views are cut from it at `input_size`.
    input_size: int | None = None
    train_aspects: torch.Tensor | None = None
    test_aspects: torch.Tensor | None = None
    pretrain_aspects: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None  # label i's name, where the data set has names (figures show them)

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        """The network's input size (the stored images' unless the cache stores them larger)."""
        return self.input_size or self.train_images.shape[-1]

    @property
    def ssl_images(self) -> torch.Tensor:
        """Images used for self-supervised pretraining."""
        return self.train_images if self.pretrain_images is None else self.pretrain_images

    @property
    def ssl_aspects(self) -> torch.Tensor | None:
        return self.train_aspects if self.pretrain_images is None else self.pretrain_aspects


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the samples of every class (at least one per class), in increasing order.
    One sort of the labels, not a pass per class (1,000 passes over 1.28M labels for ImageNet)."""
    g = torch.Generator().manual_seed(seed)
    by_class = torch.argsort(labels.cpu(), stable=True)
    counts = torch.bincount(labels.cpu())
    picks = []
    for members in by_class.split(counts.tolist()):
        if len(members):
            count = max(1, round(fraction * len(members)))
            picks.append(members[torch.randperm(len(members), generator=g)[:count]])
    return torch.cat(picks).sort().values


def subset_size(subset: int | float | None, images: int) -> int:
    """How many of `images` training images `data.subset` (a count or a fraction) keeps."""
    if subset is None:
        return images
    return subset if isinstance(subset, int) else max(1, round(subset * images))


def subset_rows(dataset: ImageDataset, subset: int | float | None, seed: int) -> torch.Tensor | None:
    """`data.subset`: the rows of `dataset.ssl_images` a trial trains on, in increasing order (None: all).
    Stratified by class when the training images are labelled (about the same fraction of every class, at
    least one image each), at random from unlabelled ones (STL-10's); fixed by `seed`, so every trial of
    a search trains on the same images."""
    n = len(dataset.ssl_images)
    count = subset_size(subset, n)
    if count > n:
        raise DataError(f"data.subset ({subset}) asks for more than the data set's {n} training images")
    if count == n:
        return None
    if dataset.pretrain_images is None:
        return stratified_subset(dataset.train_labels, count / n, seed)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): the MNIST / Fashion-MNIST format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {data.size} bytes")
    return data.reshape(shape).copy()  # frombuffer is read-only


def find_in_root(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (root / name).exists():
            return root / name
    raise DataError(f"{root}: no {what} found (looked for {', '.join(names)})")


def _from_numpy(name: str, xtr, ytr, xte, yte, num_classes: int, pretrain=None,
                class_names: Sequence[str] | None = None) -> ImageDataset:
    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        return (t.unsqueeze(1) if t.ndim == 3 else t).contiguous()

    return ImageDataset(
        name=name,
        train_images=images(xtr),
        train_labels=torch.from_numpy(np.asarray(ytr, dtype=np.int64)),
        test_images=images(xte),
        test_labels=torch.from_numpy(np.asarray(yte, dtype=np.int64)),
        num_classes=num_classes,
        pretrain_images=None if pretrain is None else images(pretrain),
        # names only when the data set's list covers its labels (a partial list would mislabel)
        class_names=tuple(class_names) if class_names is not None and len(class_names) == num_classes else None,
    )


def load_bundled() -> ImageDataset:
    with resources.files("ssl_tune.data").joinpath(BUNDLED_FILE).open("rb") as f:
        arrays = np.load(f)
        return _from_numpy(
            "fashion_mnist_subset",
            arrays["train_images"], arrays["train_labels"],
            arrays["test_images"], arrays["test_labels"], 10, class_names=FASHION_MNIST_CLASSES,
        )


def load_fashion_mnist(root: Path) -> ImageDataset:
    def part(prefix: str, kind: str) -> np.ndarray:
        return read_idx(find_in_root(root, [f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"], f"{prefix}-{kind}"))

    return _from_numpy(
        "fashion_mnist",
        part("train", "images-idx3"), part("train", "labels-idx1"),
        part("t10k", "images-idx3"), part("t10k", "labels-idx1"), 10, class_names=FASHION_MNIST_CLASSES,
    )


def _official(cls, root: Path, what: str, **kwargs):
    """torchvision's reader `cls` of an official release in `root` (the folder that holds the release's
    own folder, e.g. `cifar-10-batches-py/`, or that folder itself), without downloading.

    torchvision checks every file against the release's MD5 before it reads any: the CIFAR batches
    are pickles, and only the published ones get unpickled. A missing or different file is a
    DataError naming it.
    """
    from torchvision.datasets.utils import check_integrity

    base = root.parent if root.name == cls.base_folder and not (root / cls.base_folder).is_dir() else root
    files = [*cls.train_list, *cls.test_list] + ([[cls.meta["filename"], cls.meta["md5"]]] if hasattr(cls, "meta") else [])
    for name, md5 in files:
        path = base / cls.base_folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing; {what} is read from its official release, nothing is downloaded")
        if not check_integrity(str(path), md5):
            raise DataError(f"{path}: not the file of the official {what} release (its MD5 differs from "
                            f"{md5}, which torchvision checks before reading it)")
    try:
        return cls(str(base), download=False, **kwargs)
    except Exception as exc:  # the checksums passed, so this is unexpected: name the folder
        raise DataError(f"{base / cls.base_folder}: {what} could not be read ({type(exc).__name__}: {exc})") from exc


def load_cifar10(root: Path) -> ImageDataset:
    """CIFAR-10, python version (`cifar-10-batches-py/`), through torchvision's reader."""
    from torchvision.datasets import CIFAR10

    train, test = (_official(CIFAR10, root, "CIFAR-10", train=split) for split in (True, False))
    return _from_numpy("cifar10", train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
                       test.data.transpose(0, 3, 1, 2), np.asarray(test.targets), 10,
                       class_names=train.classes)


def load_cifar100(root: Path) -> ImageDataset:
    """CIFAR-100, python version (`cifar-100-python/`), fine labels, through torchvision's reader."""
    from torchvision.datasets import CIFAR100

    train, test = (_official(CIFAR100, root, "CIFAR-100", train=split) for split in (True, False))
    return _from_numpy("cifar100", train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
                       test.data.transpose(0, 3, 1, 2), np.asarray(test.targets), 100,
                       class_names=train.classes)


def load_stl10(root: Path) -> ImageDataset:
    """STL-10 binary version (`stl10_binary/`), through torchvision's reader.

    Pretraining uses train + unlabeled; kNN and probes use the labelled train/test splits.
    """
    from torchvision.datasets import STL10

    pretrain, test = _official(STL10, root, "STL-10", split="train+unlabeled"), _official(STL10, root, "STL-10", split="test")
    labelled = int((pretrain.labels >= 0).sum())  # train comes first, then the unlabeled images (label -1)
    return _from_numpy("stl10", pretrain.data[:labelled], pretrain.labels[:labelled].astype(np.int64),
                       test.data, test.labels.astype(np.int64), 10, pretrain.data,
                       class_names=getattr(test, "classes", None))


def load_dataset(name: str, root: Path | None = None) -> ImageDataset:
    """Read a data set that comes as arrays, by name, into memory; raises DataError naming the root
    when it cannot. (Image folders are decoded into a cache: `ssl_tune.data.cache.open_dataset`.)"""
    if name == "fashion_mnist_subset":
        return load_bundled()
    if name == "fashion_mnist":
        return load_fashion_mnist(root or DEBIAN_FASHION_MNIST)
    if root is None:
        raise DataError(f"data set {name!r} needs data.root")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if name == "cifar10":
        return load_cifar10(root)
    if name == "cifar100":
        return load_cifar100(root)
    if name == "stl10":
        return load_stl10(root)
    raise DataError(f"unknown data set {name!r}; allowed: {', '.join(DATASET_NAMES)}")
