"""Batches of augmented views drawn from an in-memory uint8 data set, sharded over DDP ranks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterable, Iterator

import numpy as np
import torch

from ssl_tune.data.augment import ViewAugmentation, augment_batch


def _mix(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (epoch and rank streams stay independent)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def channel_histogram(images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """C x 256 counts of each uint8 value per channel, a chunk at a time (a memory-mapped data set is
    never materialised as floats)."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = torch.as_tensor(images[start:start + chunk])
        for c in range(part.shape[1]):
            counts[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).to(torch.float64)
    return counts


def stats_from_histogram(counts: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) standard deviation of the values in [0, 1], exactly, from
    `channel_histogram`'s counts (which decoding workers can add up chunk by chunk)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(dim=1)
    mean = (counts * values).sum(dim=1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(dim=1) / (n - 1).clamp_min(1)
    return mean.tolist(), var.sqrt().tolist()


# Statistics of larger data sets come from this many images, evenly spaced: accurate to about 1e-4,
# and a fraction of a second instead of a pass over every image (2.3 GB for 90k images at 96 px).
STATS_IMAGES = 10_000


def channel_stats(images: torch.Tensor, max_images: int = STATS_IMAGES) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1], exact over the
    images (or `max_images` of them, evenly spaced), from a histogram (about 10x faster than floats)."""
    if len(images) > max_images:
        images = images[torch.linspace(0, len(images) - 1, max_images).round().long()]
    return stats_from_histogram(channel_histogram(images))


# The smallest standard deviation divided by (a constant channel would otherwise divide by 0).
MIN_STD = 1e-3


class Normalizer:
    """Per-channel standardisation with statistics of the training images (or given ones: a data
    cache stores them, so a memory-mapped data set is not read whole to compute them)."""

    def __init__(self, images: torch.Tensor | None = None, *,
                 stats: tuple[list[float], list[float]] | None = None) -> None:
        if stats is None:
            if images is None:
                raise ValueError("Normalizer needs the training images or their statistics")
            stats = channel_stats(images)
        mean, std = stats
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).clamp_min(MIN_STD).view(1, -1, 1, 1)

    def to(self, device: torch.device) -> Normalizer:
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """float images in [0, 1] -> standardised."""
        return (x - self.mean) / self.std

    def uint8(self, images: torch.Tensor) -> torch.Tensor:
        return self(images.float() / 255)


class ViewLoader:
    """Each step yields this rank's rows of one global batch, as one tensor per view.

    The epoch's order depends only on (seed, epoch), so 1 process and W ranks see the same global
    batches, and a run resumed at an epoch boundary sees the same data as an uninterrupted one.

    Where the images are decides how a batch reaches `device`:

    * resident (`stream=False`, `images` on `device`): rows are gathered there; the fast path for small sets.
    * streamed (`stream=True`, `images` on the host, typically the memory-mapped cache): a background thread gathers
      this rank's rows of the next `prefetch` batches into host buffers (pinned for CUDA, so the copy
      to the device does not block), and only those rows reach the device. Device memory for data is
      O(batch), and host memory beyond the mapped pages too.

    Both give the same batches bit for bit: the same rows, augmented on `device` with the same generator.
    """

    def __init__(
        self,
        images: torch.Tensor,
        views: list[ViewAugmentation],
        normalizer: Normalizer,
        *,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        stream: bool = False,
        prefetch: int = 2,
        aspects: torch.Tensor | None = None,
        size: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by {world_size} workers")
        self.images, self.views, self.normalizer = images, views, normalizer
        self.rows = rows  # `data.subset`: the rows of `images` an epoch draws from (None: all of them)
        if self.num_images < global_batch_size:
            raise ValueError(f"batch size {global_batch_size} is larger than the data set ({self.num_images} images)")
        self.global_batch_size, self.seed, self.rank = global_batch_size, seed, rank
        self.local_batch_size = global_batch_size // world_size
        self.device = torch.device(device) if device is not None else images.device
        if not stream and images.device != self.device:
            raise ValueError(f"resident images must be on {self.device}, not {images.device} (or stream them)")
        self.stream, self.prefetch = stream, max(1, prefetch)
        # Images that hold whole pictures resized to a square (the image-folder cache): each picture's
        # width / height, so that crops follow the original's geometry; views come out at `size` pixels.
        self.aspects, self.size = aspects, size

    @property
    def num_images(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.images)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch_size

    def indices(self, epoch: int) -> list[torch.Tensor]:
        """This rank's rows of every step of `epoch`, in order."""
        order = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        if self.rows is not None:
            order = self.rows[order]
        lo = self.rank * self.local_batch_size
        return [order[step * self.global_batch_size + lo: step * self.global_batch_size + lo + self.local_batch_size]
                for step in range(self.steps_per_epoch)]

    def batches(self, indices: list[torch.Tensor]) -> Iterable[torch.Tensor]:
        """The uint8 rows of each of `indices`, on `device`."""
        if not self.stream:
            return (self.images[idx.to(self.device)] for idx in indices)
        return _Prefetcher(self.images, indices, self.device, self.prefetch)

    def epoch(self, epoch: int) -> Generator[list[torch.Tensor], None, None]:
        g = torch.Generator(device=self.device).manual_seed(_mix(self.seed, epoch, self.rank, 1))
        indices = self.indices(epoch)
        batches = self.batches(indices)
        try:
            for idx, batch in zip(indices, batches):
                aspect = self.aspects[idx].to(self.device) if self.aspects is not None else None
                yield [self.normalizer(augment_batch(batch, view, g, aspect=aspect, size=self.size)) for view in self.views]
        finally:
            if isinstance(batches, _Prefetcher):
                batches.close()


class _Prefetcher:
    """Gathers rows of a host tensor into a ring of host buffers on a background thread, `depth` batches
    ahead of the consumer, and hands each to the consumer on `device`.

    The gather is NumPy's `take`, which releases the GIL, so it (and the page faults of a memory-mapped
    cache) overlaps the training step. A buffer is reused only once the consumer is done with it: on a CPU the
    consumer is done when it asks for the next batch (it holds one at a time); on CUDA once the
    non-blocking copy out of the pinned buffer has finished (an event per buffer).
    """

    def __init__(self, images: torch.Tensor, indices: list[torch.Tensor], device: torch.device, depth: int) -> None:
        self.images, self.indices, self.device = images, indices, device
        pin = device.type == "cuda"
        shape = (len(indices[0]) if indices else 0, *images.shape[1:])
        # depth batches queued, one being written, one held by the consumer
        self.buffers = [torch.empty(shape, dtype=images.dtype, pin_memory=pin) for _ in range(depth + 2)]
        self.copied: list[torch.cuda.Event | None] = [None] * len(self.buffers)
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="ssl-tune-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for step, idx in enumerate(self.indices):
                slot = step % len(self.buffers)
                copied = self.copied[slot]
                if copied is not None:
                    copied.synchronize()
                # NumPy's take: one thread, GIL released. torch's index_select would start an OpenMP team
                # of its own here, which competes for the cores with the training step's.
                np.take(self.images.numpy(), idx.numpy(), axis=0, out=self.buffers[slot].numpy())
                if not self._put(slot):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buffer = self.buffers[item]
            if self.device.type == "cuda":
                batch = buffer.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.copied[item] = event
                yield batch
            else:
                yield buffer.to(self.device)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def gather_rows(images: torch.Tensor, rows: torch.Tensor, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """`images[rows]` on `device`, copied a chunk at a time: the subset of a memory-mapped cache never sits
    whole in host memory (a quarter of ImageNet-1k at 160 px is 25 GB, on each of a node's 8 ranks)."""
    out = torch.empty((len(rows), *images.shape[1:]), dtype=images.dtype, device=device)
    for start in range(0, len(rows), chunk):
        out[start:start + chunk] = images[rows[start:start + chunk]].to(device)
    return out
