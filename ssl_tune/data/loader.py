"""Batches of augmented views drawn from an in-memory uint8 data set, sharded over DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ssl_tune.data.augment import ViewAugmentation, augment_batch


def _mix(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (epoch and rank streams stay independent)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


class Normalizer:
    """Per-channel standardisation with statistics of the training images."""

    def __init__(self, images: torch.Tensor) -> None:
        x = images.float() / 255
        self.mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        self.std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)

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
    ) -> None:
        if global_batch_size % world_size:
            raise ValueError(f"batch size {global_batch_size} is not divisible by {world_size} workers")
        if len(images) < global_batch_size:
            raise ValueError(f"batch size {global_batch_size} is larger than the data set ({len(images)} images)")
        self.images, self.views, self.normalizer = images, views, normalizer
        self.global_batch_size, self.seed, self.rank = global_batch_size, seed, rank
        self.local_batch_size = global_batch_size // world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.images) // self.global_batch_size

    def epoch(self, epoch: int) -> Iterator[list[torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(_mix(self.seed, epoch)))
        g = torch.Generator(device=self.images.device).manual_seed(_mix(self.seed, epoch, self.rank, 1))
        lo = self.rank * self.local_batch_size
        for step in range(self.steps_per_epoch):
            idx = order[step * self.global_batch_size + lo : step * self.global_batch_size + lo + self.local_batch_size]
            batch = self.images[idx.to(self.images.device)]
            yield [self.normalizer(augment_batch(batch, view, g)) for view in self.views]
