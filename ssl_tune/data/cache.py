"""A decoded, memory-mapped cache of a data set, built once per node and shared by every trial.

`open_dataset(data)` returns the spec's data set with its images as read-only memory maps of
uint8 array files (one per split, N x C x H x W) in the cache. Every process on a node that maps
them reads the same pages of the OS page cache, so the images are in memory once however many
trials and DDP workers use them, and a data set larger than memory streams from disk.

An image folder's cache stores each whole picture resized to a square of `data.cache_size` pixels
(default 1.15 x `data.image_size`), nothing cut off, with its original width / height: training crops
follow torchvision's RandomResizedCrop on the original picture (`ssl_tune.data.augment.sample_crops`),
and evaluation sees its centre square at `image_size`, as Resize + CenterCrop would.

The cache of a data set is a directory `CACHE/NAME-SIZE-KEY/` (KEY: the source root, resolution and
options) holding the arrays, labels and a manifest: the format version, a fingerprint of the source
(`fingerprint`: directory listings and modification times), class names, per-channel mean and std,
and the files skipped as corrupt. It is rebuilt when the fingerprint no longer matches (a file added,
removed or renamed), or on `ssl-tune prepare --refresh` (a file rewritten in place). Building happens
under an exclusive file lock, into a temporary directory that is renamed into place once complete, so
two processes never both build it and a killed build leaves nothing that a later run would trust.

Where: `data.cache_dir`, else `$SSL_TUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/ssl-tune` (`~/.cache/ssl-tune`).
On a cluster each node builds or reuses its own copy, so point it at a node-local disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_tune.data.datasets import DEBIAN_FASHION_MNIST, DataError, ImageDataset, load_bundled, load_dataset
from ssl_tune.data.loader import channel_stats

# 2: image folders store each whole picture resized to a square of data.cache_size, with its aspect ratio.
FORMAT_VERSION = 2
CACHE_ENV = "SSL_TUNE_CACHE_DIR"
DEFAULT_IMAGE_SIZE = 64  # imagefolder without data.image_size
MANIFEST = "manifest.json"
SPLITS = ("train", "test", "pretrain")
KEEP_SKIPPED = 1000  # skipped files named in the manifest (all are counted)


def default_cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-tune"


@dataclass
class CacheInfo:
    """Where a data set's cache is and what it holds; `built` says whether this call decoded it."""

    path: Path
    manifest: dict[str, Any]
    built: bool = False

    @property
    def skipped(self) -> int:
        return int(self.manifest.get("skipped_count", 0))

    def summary(self) -> str:
        m = self.manifest
        shapes = ", ".join(f"{split} {m['splits'][split]['shape'][0]:,}" for split in SPLITS if split in m["splits"])
        size = sum((self.path / m["splits"][s]["images"]).stat().st_size for s in m["splits"])
        c, h, w = m["splits"]["train"]["shape"][1:]
        how = (f"built in {m['build_seconds']:.1f} s ({m['images_per_s']:,.0f} img/s)" if self.built
               else "reused (up to date with its source)")
        skipped = f"; {self.skipped:,} corrupt file(s) skipped" if self.skipped else ""
        seen = f" (whole pictures, seen at {m['input_size']} px)" if m.get("input_size") not in (None, h) else ""
        return (f"data cache {self.path}: {m['dataset']} {c}x{h}x{w}{seen}, {shapes} images, {m['num_classes']} classes, "
                f"{f'{size / 2**30:.2f} GiB' if size >= 2**30 else f'{size / 2**20:.1f} MiB'}; {how}{skipped}")


def source_root(data) -> Path | None:
    if data.name == "fashion_mnist":
        return Path(data.root or DEBIAN_FASHION_MNIST)
    return data.root


def fingerprint(root: Path, exclude: Path | None = None) -> str:
    """A digest of the folder tree under `root` (but not under `exclude`: a cache kept inside the data
    root) from directory listings alone: every directory's relative path and modification time, and
    the names of its files. A file added, removed or renamed changes its directory's listing and time;
    no file is opened or stat-ed (1.3M stats take minutes on NFS or Lustre). A file rewritten in place
    under the same name is not seen: `ssl-tune prepare --refresh` rebuilds."""
    digest = hashlib.sha256()
    count = 0
    skip = str(Path(exclude).resolve()) if exclude else None
    for directory, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if os.path.join(directory, d) != skip)
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError:
            continue
        digest.update(f"{os.path.relpath(directory, root)}\0{mtime}\0{chr(0).join(sorted(files))}\n".encode())
        count += len(files)
    return f"{count}:{digest.hexdigest()}"


def cache_base(data) -> Path:
    return Path(data.cache_dir) if data.cache_dir else default_cache_root()


def cache_path(data) -> Path:
    """The directory of `data`'s cache: one per source root, resolution and options."""
    base = cache_base(data)
    size = stored_size(data)
    root = source_root(data)
    key = hashlib.sha256(json.dumps([FORMAT_VERSION, data.name, str(Path(root).resolve()) if root else "", size,
                                     data.skip_corrupt]).encode()).hexdigest()[:12]
    return base / f"{data.name}-{size or 'native'}-{key}"


# An image folder's cache stores each picture larger than the network's input by this factor (by
# default), so that a crop of the whole picture is cut at about the input's resolution or more.
CACHE_MARGIN = 1.15


def input_size(data) -> int:
    """An image folder's network input size: data.image_size, else DEFAULT_IMAGE_SIZE."""
    return data.image_size or DEFAULT_IMAGE_SIZE


# (channels, side) of each data set's images as the network sees them, known without reading them.
NETWORK_INPUTS = {"fashion_mnist_subset": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32),
                  "stl10": (3, 96)}


def network_input(data) -> tuple[int, int]:
    """(channels, side) of the images the backbone takes; an image folder is decoded to RGB."""
    return NETWORK_INPUTS.get(data.name) or (3, input_size(data))


def stored_size(data) -> int | None:
    """The side of the square an image folder's cache stores each picture in (`data.cache_size`, else
    CACHE_MARGIN x the input size); None for data sets stored as they come."""
    if data.name != "imagefolder":
        return None
    return data.cache_size or math.ceil(CACHE_MARGIN * input_size(data))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT_VERSION else None


def _map(path: Path, shape: list[int]) -> torch.Tensor:
    # Copy-on-write: read pages are shared with every process mapping the file; a write (none is
    # made) would copy that page for this process only, never change the cache.
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=tuple(shape)))


def _dataset(path: Path, manifest: dict[str, Any]) -> ImageDataset:
    splits = manifest["splits"]

    def images(split: str) -> torch.Tensor | None:
        return _map(path / splits[split]["images"], splits[split]["shape"]) if split in splits else None

    def required_images(split: str) -> torch.Tensor:
        found = images(split)
        if found is None:
            raise DataError(f"the data cache at {path} has no {split} split; delete it to build it again")
        return found

    def labels(split: str) -> torch.Tensor:
        return torch.from_numpy(np.load(path / splits[split]["labels"]))

    def aspects(split: str) -> torch.Tensor | None:
        name = splits.get(split, {}).get("aspects")
        return torch.from_numpy(np.load(path / name)) if name else None

    return ImageDataset(
        name=manifest["dataset"], train_images=required_images("train"), train_labels=labels("train"),
        test_images=required_images("test"), test_labels=labels("test"), num_classes=manifest["num_classes"],
        pretrain_images=images("pretrain"), channel_stats=(manifest["mean"], manifest["std"]),
        input_size=manifest.get("input_size"), train_aspects=aspects("train"), test_aspects=aspects("test"),
        pretrain_aspects=aspects("pretrain"), class_names=tuple(manifest["classes"]),
    )


@contextlib.contextmanager
def _locked(lock_path: Path, stream):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish the data cache {lock_path.with_suffix('')}", file=stream,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_dataset(data, *, expected: str | None = None, stream=None, build: bool = True, refresh: bool = False,
                 workers: int | None = None) -> tuple[ImageDataset, CacheInfo | None]:
    """The data set of a spec's `data` section, from its cache (built or rebuilt first when missing
    or stale). `expected`: the source fingerprint the caller already computed (a search's driver
    passes its own to the trials, so they do not walk the source again). `build=False`: a missing or
    stale cache is a DataError instead (a trial, which holds GPUs, never decodes). `refresh`: rebuild
    even when the fingerprint matches (files edited in place). `workers`: decoding processes (default:
    every core). The bundled subset is returned as it is (no cache)."""
    stream = stream or sys.stderr
    if data.name == "fashion_mnist_subset":
        return load_bundled(), None
    root = source_root(data)
    if root is None or not Path(root).is_dir():
        raise DataError(f"{root}: not a directory" if root else f"data set {data.name!r} needs data.root")
    path = cache_path(data)
    current = expected or fingerprint(Path(root), exclude=cache_base(data))
    manifest = _read_manifest(path)
    if manifest is not None and manifest["fingerprint"] == current and not refresh:
        return _dataset(path, manifest), CacheInfo(path, manifest)
    if not build:
        raise DataError(f"data cache {path} is {'stale: its source changed' if manifest else 'missing'} on this "
                        "node; trials do not decode: `ssl-tune run` and `resume` build it on every node before any "
                        "trial (or run `ssl-tune prepare SPEC --address ADDR`)")
    try:
        with _locked(path.with_name(path.name + ".lock"), stream):
            manifest = _read_manifest(path)  # built by another process while this one waited
            if manifest is not None and manifest["fingerprint"] == current and not refresh:
                return _dataset(path, manifest), CacheInfo(path, manifest)
            reason = "stale: its source changed" if path.exists() else "missing"
            print(f"data cache {path} is {reason}; decoding {data.name} from {root}", file=stream, flush=True)
            manifest = _build(data, Path(root), path, current, stream, workers)
    except OSError as exc:
        raise DataError(f"data cache {path}: {exc.strerror or exc} (set data.cache_dir or ${CACHE_ENV} to a "
                        "writable directory)") from None
    return _dataset(path, manifest), CacheInfo(path, manifest, built=True)


def _build(data, root: Path, path: Path, current: str, stream, workers: int | None) -> dict[str, Any]:
    """Decode into a fresh temporary directory, then rename it into place (the lock is held)."""
    for leftover in path.parent.glob(f"{path.name}.tmp-*"):  # from a killed build: never trusted
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        if data.name == "imagefolder":
            splits, classes, skipped = _build_imagefolder(data, root, tmp, stream, workers)
        else:
            splits, classes, skipped = _build_arrays(data, root, tmp)
        train = np.memmap(tmp / splits["train"]["images"], dtype=np.uint8, mode="c",
                          shape=tuple(splits["train"]["shape"]))
        mean, std = channel_stats(torch.from_numpy(train))  # the normaliser's, stored: trials need not read it all
        seconds = time.perf_counter() - started
        images = sum(s["shape"][0] for s in splits.values())
        manifest = {
            "format": FORMAT_VERSION, "dataset": data.name, "root": str(root), "image_size": data.image_size,
            "input_size": input_size(data) if data.name == "imagefolder" else None, "stored_size": stored_size(data),
            "skip_corrupt": data.skip_corrupt, "fingerprint": current, "splits": splits, "classes": classes,
            "num_classes": len(classes), "mean": mean, "std": std, "skipped_count": len(skipped),
            "skipped": [[f, e] for f, e in skipped[:KEEP_SKIPPED]], "build_seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a directory without it is incomplete
        old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        if path.exists():
            os.rename(path, old)  # processes that mapped the old files keep reading them
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(tmp: Path, split: str, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    images = np.ascontiguousarray(images)
    out = np.memmap(tmp / f"{split}_images.u8", dtype=np.uint8, mode="w+", shape=images.shape)
    out[:] = images
    out.flush()
    np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    return {"images": f"{split}_images.u8", "labels": f"{split}_labels.npy", "shape": list(images.shape)}


def _build_arrays(data, root: Path, tmp: Path) -> tuple[dict, list[str], list]:
    """Data sets that come as arrays (Fashion-MNIST, CIFAR, STL-10): read once, write as they are."""
    d = load_dataset(data.name, root)
    splits = {"train": _write_split(tmp, "train", d.train_images.numpy(), d.train_labels.numpy()),
              "test": _write_split(tmp, "test", d.test_images.numpy(), d.test_labels.numpy())}
    if d.pretrain_images is not None:
        splits["pretrain"] = _write_split(tmp, "pretrain", d.pretrain_images.numpy(), np.zeros(0))
    return splits, list(d.class_names or [str(c) for c in range(d.num_classes)]), []


def _build_imagefolder(data, root: Path, tmp: Path, stream, workers: int | None) -> tuple[dict, list[str], list]:
    from ssl_tune.data.imagefolder import Progress, decode_split, list_folder

    size = stored_size(data)
    if size is None:
        raise ValueError(f"data.name {data.name!r} is not an image folder")
    listing = list_folder(root)
    # The arrays are sparse files filled as images decode: a disk too small fails hours in, so check first.
    needed = (len(listing.train.files) + len(listing.test.files)) * 3 * size * size
    free = shutil.disk_usage(tmp).free
    if needed > free:
        raise DataError(f"the cache needs {needed / 2**30:,.2f} GiB ({len(listing.train.files) + len(listing.test.files):,} "
                        f"images x 3 x {size} x {size} bytes) but {tmp.parent} has {free / 2**30:,.2f} GiB free; free "
                        "space there, point data.cache_dir (or $SSL_TUNE_CACHE_DIR) at a larger disk, or lower "
                        "data.cache_size or data.image_size")
    splits, skipped = {}, []
    for name, split in (("train", listing.train), ("test", listing.test)):
        progress = Progress(f"decoding {root.name}/{split.directory.name}", len(split.files), stream)
        out = tmp / f"{name}_images.u8"
        aspects, failures = decode_split(split, out, size, skip_corrupt=data.skip_corrupt, progress=progress.advance,
                                         workers=workers)
        progress.close()
        labels = np.asarray(split.labels, dtype=np.int64)
        shape = [len(split.files), 3, size, size]
        if failures:
            keep = np.ones(len(split.files), dtype=bool)
            keep[[row for row, _, _ in failures]] = False
            _compact(out, shape, keep)
            labels, aspects, shape[0] = labels[keep], aspects[keep], int(keep.sum())
            skipped += [(path, error) for _, path, error in failures]
        if shape[0] == 0:
            raise DataError(f"{split.directory}: no image could be decoded")
        np.save(tmp / f"{name}_labels.npy", labels)
        np.save(tmp / f"{name}_aspects.npy", aspects)
        splits[name] = {"images": out.name, "labels": f"{name}_labels.npy", "aspects": f"{name}_aspects.npy",
                        "shape": shape}
    if skipped:
        print(f"skipped {len(skipped):,} corrupt file(s) (data.skip_corrupt), e.g. {skipped[0][0]}: {skipped[0][1]}",
              file=stream, flush=True)
    return splits, listing.classes, skipped


def _compact(path: Path, shape: list[int], keep: np.ndarray, chunk: int = 4096) -> None:
    """Drop the rows not in `keep` from an array file, in place, a chunk at a time."""
    full = np.memmap(path, dtype=np.uint8, mode="r+", shape=tuple(shape))
    rows = np.flatnonzero(keep)
    for start in range(0, len(rows), chunk):  # rows only move towards the front: no overwrite of unread rows
        part = rows[start:start + chunk]
        full[start:start + len(part)] = full[part]
    full.flush()
    del full
    with open(path, "r+b") as f:
        f.truncate(int(len(rows) * np.prod(shape[1:])))
