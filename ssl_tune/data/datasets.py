"""Image data sets: every split is a uint8 tensor N x C x H x W plus int64 labels.

Nothing is downloaded. The default data set is a Fashion-MNIST subset shipped inside the
package; the others are read from a root the user gives, in their official on-disk formats, and
kept in a decoded cache (`ssl_tune.data.cache`) that trials memory-map.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FILE = "fashion_mnist_subset.npz"
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

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def ssl_images(self) -> torch.Tensor:
        """Images used for self-supervised pretraining."""
        return self.train_images if self.pretrain_images is None else self.pretrain_images


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


def _from_numpy(name: str, xtr, ytr, xte, yte, num_classes: int, pretrain=None) -> ImageDataset:
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
    )


def load_bundled() -> ImageDataset:
    with resources.files("ssl_tune.data").joinpath(BUNDLED_FILE).open("rb") as f:
        arrays = np.load(f)
        return _from_numpy(
            "fashion_mnist_subset",
            arrays["train_images"], arrays["train_labels"],
            arrays["test_images"], arrays["test_labels"], 10,
        )


def load_fashion_mnist(root: Path) -> ImageDataset:
    def part(prefix: str, kind: str) -> np.ndarray:
        return read_idx(find_in_root(root, [f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"], f"{prefix}-{kind}"))

    return _from_numpy(
        "fashion_mnist",
        part("train", "images-idx3"), part("train", "labels-idx1"),
        part("t10k", "images-idx3"), part("t10k", "labels-idx1"), 10,
    )


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python-version batch holds: dicts, lists, bytes, str, numbers and
    numpy arrays. A plain `pickle.load` would run whatever code a crafted file in `data.root` names."""

    # How numpy (1.x and 2.x, every pickle protocol) rebuilds an array; `_codecs.encode` is how
    # protocol 2 writes bytes. None of these runs anything but array or bytes construction.
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays, "
                                         "lists and strings")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unreadable file is a malformed root
        raise DataError(f"{path}: not a CIFAR python-version batch ({exc})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR python-version batch (holds a {type(entry).__name__}, not a dict)")
    return entry


def _cifar_arrays(batches: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in batches:
        entry = _unpickle(path)
        if b"data" not in entry or label_key not in entry:
            raise DataError(f"{path}: missing b'data' or {label_key!r}")
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key]))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(root: Path) -> ImageDataset:
    """CIFAR-10, python version (`cifar-10-batches-py/data_batch_{1..5}`, `test_batch`)."""
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    train = [find_in_root(base, [f"data_batch_{i}"], f"data_batch_{i}") for i in range(1, 6)]
    xtr, ytr = _cifar_arrays(train, b"labels")
    xte, yte = _cifar_arrays([find_in_root(base, ["test_batch"], "test_batch")], b"labels")
    return _from_numpy("cifar10", xtr, ytr, xte, yte, 10)


def load_cifar100(root: Path) -> ImageDataset:
    """CIFAR-100, python version (`cifar-100-python/train`, `test`), fine labels."""
    base = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    xtr, ytr = _cifar_arrays([find_in_root(base, ["train"], "train")], b"fine_labels")
    xte, yte = _cifar_arrays([find_in_root(base, ["test"], "test")], b"fine_labels")
    return _from_numpy("cifar100", xtr, ytr, xte, yte, 100)


def _stl_images(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DataError(f"{path}: size is not a multiple of one 3x96x96 image")
    # The binary files are column-major: swap to rows-first.
    return raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


def load_stl10(root: Path) -> ImageDataset:
    """STL-10 binary version (`stl10_binary/{train,test,unlabeled}_X.bin`, `*_y.bin`).

    Pretraining uses train + unlabeled; kNN and probes use the labelled train/test splits.
    """
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    xtr = _stl_images(find_in_root(base, ["train_X.bin"], "train_X.bin"))
    ytr = np.fromfile(find_in_root(base, ["train_y.bin"], "train_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    xte = _stl_images(find_in_root(base, ["test_X.bin"], "test_X.bin"))
    yte = np.fromfile(find_in_root(base, ["test_y.bin"], "test_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    pretrain = None
    if (base / "unlabeled_X.bin").exists():
        pretrain = np.concatenate([xtr, _stl_images(base / "unlabeled_X.bin")])
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataError(f"{base}: image and label counts differ")
    return _from_numpy("stl10", xtr, ytr, xte, yte, 10, pretrain)


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
