"""Image folders as users have them: `root/train/<class>/*` and `root/test/<class>/*` (or `val/`).

Listing uses torchvision's own `ImageFolder` rules (class folders, image extensions; other files are
ignored). Decoding (PIL) runs in worker processes, one chunk of files each, and writes every image
straight into its row of an output array (a memory-mapped cache file), so nothing is held twice. Grey,
palette, RGBA, CMYK and 16-bit images become 8-bit RGB.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_tune.data.datasets import DataError, find_in_root

CHANNELS = 3
CHUNK = 256  # files per task: large enough to amortise the task, small enough for a live progress bar


@dataclass(frozen=True)
class Split:
    """One split of a folder: its files (in torchvision's order) and their class indices."""

    directory: Path
    files: list[str]
    labels: list[int]


@dataclass(frozen=True)
class FolderListing:
    classes: list[str]
    train: Split
    test: Split


def _split(directory: Path) -> tuple[list[str], Split]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(directory))
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:  # no class folder, or a class folder without any image file
        raise DataError(f"{directory}: {str(exc).split('. Supported extensions')[0]}") from None
    except OSError as exc:
        raise DataError(f"{directory}: cannot read ({exc.strerror or exc})") from None
    return classes, Split(directory, [path for path, _ in samples], [label for _, label in samples])


def list_folder(root: Path) -> FolderListing:
    """The files and labels of both splits; DataError naming the path for every problem."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{root}: not readable")

    classes, train = _split(find_in_root(root, ["train"], "train/ folder"))
    test_classes, test = _split(find_in_root(root, ["test", "val"], "test/ or val/ folder"))
    if classes != test_classes:
        only = sorted(set(classes) ^ set(test_classes))
        raise DataError(f"{root}: {train.directory.name}/ and {test.directory.name}/ have different classes "
                        f"(only in one: {', '.join(only[:10])})")
    return FolderListing(classes, train, test)


def decode(path: str, size: int) -> tuple[np.ndarray, float]:
    """One file -> (uint8 RGB 3 x size x size, width / height). The whole picture is resized into the
    square (`squash`), none of it cut off; its aspect ratio is returned so that crops can follow the
    original's geometry. Raises on a file that is not a whole image (a truncated JPEG too)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        pixels = rgb_pixels(image)
    aspect = pixels.shape[2] / pixels.shape[1]
    if pixels.shape[1:] == (size, size):
        return pixels, aspect  # already the cache's size: nothing to resample
    import torch

    return squash(torch.from_numpy(np.ascontiguousarray(pixels)), size).numpy(), aspect


def squash(images, size: int):
    """uint8 images (... x H x W tensor) -> ... x size x size: the whole picture resized (antialiased),
    its aspect ratio not kept (the cache records it)."""
    from torchvision.transforms.v2 import functional as F

    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.resize(images, [size, size], antialias=True)


def rgb_pixels(image) -> np.ndarray:
    """A PIL image -> uint8 RGB, 3 x H x W: grey, palette, RGBA, CMYK and YCbCr become RGB; 16-bit (and
    32-bit) grey is scaled to 8 bits."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit (or 32-bit int) grey
        grey = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or grey.max() <= 65535 else grey.max() / 255
        image = Image.fromarray(np.clip(np.round(grey / scale), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)  # 3 x H x W, a view


def fit_size(images, size: int):
    """uint8 images (... x H x W tensor) -> ... x size x size: the shorter side resized to `size`
    (antialiased), then centre-cropped, as torchvision's Resize + CenterCrop do."""
    from torchvision.transforms.v2 import functional as F

    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.center_crop(F.resize(images, [size], antialias=True), [size, size])


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def _decode_chunk(task: tuple[str, tuple[int, ...], int, int, list[str]]
                  ) -> tuple[int, int, list[float], list[tuple[int, str, str]]]:
    """Decode files into rows `start...` of the array file `out_path`; returns (start, done, aspect
    ratios, failures)."""
    out_path, shape, start, size, files = task
    rows = np.zeros((len(files), *shape[1:]), dtype=np.uint8)  # a failed file's row stays zero
    aspects = [1.0] * len(files)
    failures = []
    for offset, path in enumerate(files):
        try:
            rows[offset], aspects[offset] = decode(path, size)
        except Exception as exc:  # corrupt, truncated, not an image after all
            failures.append((start + offset, path, f"{type(exc).__name__}: {exc}"))
    # One write per chunk: cheaper than faulting in the pages of a mapping one image at a time.
    fd = os.open(out_path, os.O_WRONLY)
    try:
        view, offset = memoryview(rows.data).cast("B"), start * rows[0].nbytes
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
    return start, len(files), aspects, failures


PROGRESS_LINE_S = 10.0  # without a terminal: one progress line this often


class Progress:
    """A one-line progress bar with images/s on a terminal; a single summary line otherwise."""

    def __init__(self, what: str, total: int, stream=sys.stderr) -> None:
        self.what, self.total, self.stream = what, total, stream
        self.tty = stream.isatty()
        self.done, self.start, self.shown = 0, time.perf_counter(), 0.0

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.tty and (now - self.shown > 0.2 or self.done == self.total):
            self.shown = now
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {self.done:,}/{self.total:,} images, "
                  f"{self.rate:,.0f} img/s", end="", file=self.stream, flush=True)
        elif not self.tty and now - max(self.shown, self.start) > PROGRESS_LINE_S and self.done < self.total:
            self.shown = now  # a log or another node's task: a line now and then
            print(f"{self.what}: {self.done:,}/{self.total:,} images ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{self.rate:,.0f} img/s", file=self.stream, flush=True)

    def close(self) -> None:
        print("\r\033[K" if self.tty else "", f"{self.what}: {self.done:,} images in "
              f"{time.perf_counter() - self.start:.1f} s ({self.rate:,.0f} img/s)", sep="", file=self.stream, flush=True)


def decode_split(split: Split, out_path: Path, size: int, *, skip_corrupt: bool, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Decode every file of `split` into the uint8 array file `out_path` (N x 3 x size x size, created
    here) with `workers` processes (default: every core). Returns each picture's width / height and the
    failures (row, file, error); without `skip_corrupt` the first failure raises DataError naming the file."""
    shape = (len(split.files), CHANNELS, size, size)
    with open(out_path, "wb") as f:
        f.truncate(int(np.prod(shape)))  # sparse until written
    tasks = [(str(out_path), shape, start, size, split.files[start:start + CHUNK])
             for start in range(0, len(split.files), CHUNK)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    failures: list[tuple[int, str, str]] = []
    aspects = np.ones(len(split.files), dtype=np.float32)
    # fork: the workers need nothing but this module, and start at once.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(workers, initializer=_one_thread) if workers > 1 else _InProcess() as pool:
        for start, done, ratios, failed in pool.imap_unordered(_decode_chunk, tasks):
            aspects[start:start + done] = ratios
            if failed and not skip_corrupt:
                row, path, error = min(failed)
                raise DataError(f"{path}: cannot decode this image ({error}); remove or replace it, or set "
                                "data.skip_corrupt: true to leave such files out")
            failures += failed
            if progress is not None:
                progress(done)
    return aspects, sorted(failures)


class _InProcess:
    """The Pool interface, run in this process (one worker: no start-up, no pickling)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap_unordered(self, fn, tasks):
        return map(fn, tasks)
