"""What a trained backbone expects as input, and the transform that produces it.

Like torchvision's weights (``weights.transforms()``), every checkpoint carries its input contract:
the channels and image size of the data it was trained on, the per-channel mean and standard
deviation it was normalised with, and the data set's name. `Preprocess` turns a PIL image or uint8
tensor into exactly what the trainer fed the network: the same conversion, resize and crop as the
data cache, then (x / 255 - mean) / std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ssl_tune.data.loader import MIN_STD

# ITU-R 601-2 luma, PIL's "L" conversion: RGB input to a backbone trained on grey images.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class InputContract:
    """The input a backbone was trained on."""

    channels: int  # 1 (grey) or 3 (RGB)
    image_size: int  # square side in pixels
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]
    dataset: str  # the spec's data.name

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InputContract:
        return cls(channels=int(raw["channels"]), image_size=int(raw["image_size"]), mean=tuple(map(float, raw["mean"])),
                   std=tuple(map(float, raw["std"])), dataset=str(raw["dataset"]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        kind = {1: "grey", 3: "RGB"}.get(self.channels, f"{self.channels}-channel")
        numbers = lambda values: "(" + ", ".join(f"{v:.4f}" for v in values) + ")"  # noqa: E731
        return (f"{kind} {self.image_size}x{self.image_size} images as on {self.dataset}, scaled to [0, 1], then "
                f"normalised with mean {numbers(self.mean)} and std {numbers(self.std)}")


class Preprocess(nn.Module):
    """PIL image, or uint8 tensor C x H x W or N x C x H x W -> the normalised float tensor the backbone
    expects (C x S x S or N x C x S x S).

    Grey input is repeated to RGB, RGB is converted to grey (ITU-R 601 luma) where the backbone was
    trained on grey images; the shorter side is resized to the contract's size (antialiased) and the
    centre cropped, as the data cache did with the training images.
    """

    mean: torch.Tensor  # buffers: the channel statistics, on the device the transform is moved to
    std: torch.Tensor

    def __init__(self, contract: InputContract) -> None:
        super().__init__()
        self.contract = contract
        self.register_buffer("mean", torch.tensor(contract.mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(contract.std, dtype=torch.float32).clamp_min(MIN_STD).view(-1, 1, 1),
                             persistent=False)

    def forward(self, image: Any) -> torch.Tensor:
        from ssl_tune.data.imagefolder import fit_size

        pixels = self._uint8(image).to(self.mean.device)  # where `.to(device)` put this transform
        pixels = fit_size(self._channels(pixels), self.contract.image_size)
        return (pixels.float() / 255 - self.mean) / self.std

    def _uint8(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim not in (3, 4):
                raise TypeError(f"preprocess takes a PIL image or a uint8 tensor C x H x W or N x C x H x W (values "
                                f"0-255), got a {image.dtype} tensor of shape {tuple(image.shape)}")
            return image
        from ssl_tune.data.imagefolder import rgb_pixels

        if not hasattr(image, "mode"):
            raise TypeError(f"preprocess takes a PIL image or a uint8 tensor, got {type(image).__name__}")
        return torch.from_numpy(rgb_pixels(image).copy())

    def _channels(self, pixels: torch.Tensor) -> torch.Tensor:
        have, want = pixels.shape[-3], self.contract.channels
        if have == want:
            return pixels
        if have == 1:
            return pixels.expand(*pixels.shape[:-3], want, *pixels.shape[-2:]).contiguous()
        if have == 3 and want == 1:
            luma = torch.tensor(LUMA, device=pixels.device).view(3, 1, 1)
            return (pixels.float() * luma).sum(-3, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        raise ValueError(f"preprocess: the backbone takes {want}-channel images; got {have} channels")

    def extra_repr(self) -> str:
        return self.contract.describe()
