"""Augmentations applied to a whole uint8 batch at once with tensor ops (CPU or GPU).

Each sample draws its own crop, flip, jitter, blur and solarisation, as torchvision's per-image
transforms do, but the work is a handful of batched kernels instead of a Python loop over PIL
images. Presets follow the papers: ``byol`` is BYOL's asymmetric pair (blur p=1.0/0.1, solarize
p=0.0/0.2, also VICReg's and CorInfoMax's), ``symmetric`` uses one strong pipeline for both
views, ``weak`` is crop + flip only (ISD's teacher view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ssl_tune.spec import AugmentationSpec


@dataclass(frozen=True)
class ViewAugmentation:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    # Blur sigma as a fraction of the image side: BYOL's 0.1-2.0 px at 224 px.
    blur_sigma: tuple[float, float] = (0.1 / 224, 2.0 / 224)
    solarize_p: float = 0.0


def preset_views(preset: str, crop_scale: tuple[float, float], num_views: int = 2) -> list[ViewAugmentation]:
    """The per-view augmentations of a preset (first two views as in the papers, extra views like the second)."""
    strong = ViewAugmentation(crop_scale=crop_scale)
    if preset == "byol":
        views = [replace(strong, blur_p=1.0, solarize_p=0.0), replace(strong, blur_p=0.1, solarize_p=0.2)]
    elif preset == "symmetric":
        views = [replace(strong, blur_p=0.5, solarize_p=0.1)] * 2
    elif preset == "weak":
        views = [ViewAugmentation(crop_scale=crop_scale, jitter_p=0.0, grayscale_p=0.0)] * 2
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; allowed: byol, symmetric, weak")
    return (views + [views[-1]] * num_views)[:num_views]


def spec_views(augmentation: AugmentationSpec, num_views: int = 2, *, weak: bool = False) -> list[ViewAugmentation]:
    """The views a resolved spec's `data.augmentation` asks for: its preset's, with every strength the
    spec sets (not null) in place of the preset's. `weak` gives crop-and-flip views with the spec's
    crop (ISD's teacher view), which the colour, blur and solarisation strengths do not touch."""
    a = augmentation
    crop = (a.crop_min_scale, a.crop_max_scale)
    if weak:
        return preset_views("weak", crop, num_views)
    common: dict[str, Any] = {}  # ViewAugmentation's fields by name: floats, and blur_sigma's pair
    if a.jitter_strength is not None:
        s = a.jitter_strength
        common.update(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=min(0.1 * s, 0.5))
    common.update({k: v for k, v in (("jitter_p", a.jitter_p), ("grayscale_p", a.grayscale_p),
                                     ("blur_sigma", a.blur_sigma)) if v is not None})
    views = []
    for i, view in enumerate(preset_views(a.preset, crop, num_views)):
        own = a.view1 if i == 0 else a.view2
        per_view: dict[str, Any] = {k: v for k, v in (("blur_p", own.blur_p), ("solarize_p", own.solarize_p)) if v is not None}
        views.append(replace(view, **common, **per_view))
    return views


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


# torchvision's RandomResizedCrop draws up to 10 boxes and takes the first that fits in the image.
CROP_ATTEMPTS = 10


def sample_crops(n: int, aug: ViewAugmentation, g: torch.Generator, device: torch.device,
                 aspect: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes of torchvision's `RandomResizedCrop` on images whose original width / height is `aspect`
    (1 if None): per sample the width and height as fractions of the image's, and the centre in [-1, 1].

    Area fraction and aspect ratio are drawn in the original image's pixels, as torchvision does: a
    box of area s * W * H and ratio r is sqrt(s r / a) of the width and sqrt(s a / r) of the height
    (a = W / H). Up to `CROP_ATTEMPTS` draws, the first that fits; else torchvision's fallback, the
    whole image cut to the nearest allowed ratio. The centre is uniform over the positions where the
    box fits. The fractions are the same in a cache that stores the whole image resized to a square.
    """
    a = torch.ones(n, device=device) if aspect is None else aspect.to(device=device, dtype=torch.float32)
    area = _uniform(n * CROP_ATTEMPTS, *aug.crop_scale, g, device).view(n, CROP_ATTEMPTS)
    lo, hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = _uniform(n * CROP_ATTEMPTS, lo, hi, g, device).view(n, CROP_ATTEMPTS).exp()
    w, h = (area * ratio / a[:, None]).sqrt(), (area * a[:, None] / ratio).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # The fallback: the whole image, cut to the nearest ratio in the range.
    fallback_w = torch.where(a > aug.crop_ratio[1], aug.crop_ratio[1] / a, torch.ones_like(a))
    fallback_h = torch.where(a < aug.crop_ratio[0], a / aug.crop_ratio[0], torch.ones_like(a))
    found = fits.any(dim=1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
    return w, h, torch.where(found, cx, 0.0), torch.where(found, cy, 0.0)


def _resized_crop_and_flip(x: torch.Tensor, aug: ViewAugmentation, g: torch.Generator,
                           aspect: torch.Tensor | None, size: int | None) -> torch.Tensor:
    """Random resized crop (`sample_crops`) to `size` pixels (the input's if None), and horizontal flip."""
    w, h, cx, cy = sample_crops(x.shape[0], aug, g, x.device, aspect)
    flip = torch.where(torch.rand(x.shape[0], generator=g, device=x.device) < aug.flip_p, -1.0, 1.0)
    return crop_and_flip(x, w, h, cx, cy, flip, size)


def centre_view(x: torch.Tensor, aspect: torch.Tensor | None, size: int) -> torch.Tensor:
    """Evaluation's view: the centre square of the original picture (width / height `aspect`; the image
    holds all of it resized to a square) at `size` pixels, as torchvision's Resize(size) + CenterCrop(size)."""
    n = x.shape[0]
    a = torch.ones(n, device=x.device) if aspect is None else aspect.to(device=x.device, dtype=torch.float32)
    w, h = (1 / a).clamp(max=1.0), a.clamp(max=1.0)
    zero = torch.zeros(n, device=x.device)
    return crop_and_flip(x, w, h, zero, zero, torch.ones(n, device=x.device), size)


def crop_and_flip(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                  flip: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Per sample: the box of width `w` and height `h` (fractions of the image) centred at (cx, cy)
    (in [-1, 1]), resized bilinearly to `size` pixels square (the image's size if None), mirrored where
    `flip` is -1."""
    if size is not None:
        x_shape = [x.shape[0], x.shape[1], size, size]
    else:
        x_shape = list(x.shape)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, x_shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def _color_jitter(x: torch.Tensor, aug: ViewAugmentation, g: torch.Generator) -> torch.Tensor:
    """Brightness and contrast always; saturation and hue only for colour images."""
    n, device = x.shape[0], x.device
    apply = (torch.rand(n, generator=g, device=device) < aug.jitter_p).view(n, 1, 1, 1)
    y = adjust_brightness(x, _uniform(n, 1 - aug.brightness, 1 + aug.brightness, g, device))
    y = adjust_contrast(y, _uniform(n, 1 - aug.contrast, 1 + aug.contrast, g, device))
    if x.shape[1] == 3:
        y = adjust_saturation(y, _uniform(n, 1 - aug.saturation, 1 + aug.saturation, g, device))
        y = _rotate_hue(y, _uniform(n, -aug.hue, aug.hue, g, device) * 2 * math.pi)
    return torch.where(apply, y.clamp(0, 1), x)


# Per-sample colour operations (one factor per image), torchvision's formulas without the clamp
# after each step: the jitter clamps once at its end.


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x * factor.view(-1, 1, 1, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level."""
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1) + mean


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's grey version (colour images)."""
    gray = _gray(x)
    return (x - gray) * factor.view(-1, 1, 1, 1) + gray


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YIQ space (one 3x3 matrix per sample)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("nij,njhw->nihw", m, x)


def _grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] != 3 or p <= 0:
        return x
    apply = (torch.rand(x.shape[0], generator=g, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def _blur(x: torch.Tensor, aug: ViewAugmentation, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur with a per-sample sigma, as one grouped separable convolution."""
    n, c, height, width = x.shape
    apply = torch.rand(n, generator=g, device=x.device) < aug.blur_p
    idx = apply.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    side = min(height, width)
    sigma = _uniform(idx.numel(), aug.blur_sigma[0] * side, aug.blur_sigma[1] * side, g, x.device).clamp_min(1e-3)
    radius = max(1, int(side * 0.05))  # kernel of about 10% of the image side, as in BYOL
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c) x k
    sel = x[idx].reshape(1, -1, height, width)
    sel = F.pad(sel, (radius, radius, radius, radius), mode="reflect")
    sel = F.conv2d(sel, kernel.view(-1, 1, 1, 2 * radius + 1), groups=kernel.shape[0])
    sel = F.conv2d(sel, kernel.view(-1, 1, 2 * radius + 1, 1), groups=kernel.shape[0])
    out = x.clone()
    out[idx] = sel.view(-1, c, height, width)
    return out


def _solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    if p <= 0:
        return x
    apply = (torch.rand(x.shape[0], generator=g, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= 0.5), 1 - x, x)


def augment_batch(images: torch.Tensor, aug: ViewAugmentation, g: torch.Generator, *,
                  aspect: torch.Tensor | None = None, size: int | None = None) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 in [0, 1] at `size` pixels (H if None), augmented per sample.
    `aspect`: each original picture's width / height when the images hold whole pictures resized to a
    square (the image-folder cache); None for images that are the pictures. `g` must be on images' device."""
    x = images.float().div_(255)
    x = _resized_crop_and_flip(x, aug, g, aspect, size)
    if aug.jitter_p > 0:
        x = _color_jitter(x, aug, g)
    x = _grayscale(x, aug.grayscale_p, g)
    if aug.blur_p > 0:
        x = _blur(x, aug, g)
    return _solarize(x, aug.solarize_p, g)
