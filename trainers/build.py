"""A method's model built from a spec (`build_method`), and the check of a spec's backbone before any trial
(`check_backbone`): shared by the training loop, the driver's checks and the checkpoint sizing."""

from __future__ import annotations

import os

import torch

from ssl_tune import distributed
from ssl_tune.data.cache import network_input
from ssl_tune.models import backbone_from_spec, feature_dim
from ssl_tune.spec import SpecBase, SpecError
from trainers import methods
from trainers.base import Method


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_method(spec: SpecBase, in_channels: int | None = None, device: torch.device | None = None,
                 image_size: int | None = None) -> Method:
    """The method's model for a resolved spec, initialised from the spec's seed, with batch norm
    over the global batch (`distributed.convert_batchnorm`) for `device`. The input's channels and size
    default to the spec's data set's."""
    channels, size = network_input(spec.data)
    torch.manual_seed(spec.training.seed)
    try:
        backbone = backbone_from_spec(spec.backbone, in_channels or channels, image_size or size)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # the constructor's own words
        raise SpecError(f"backbone.name {spec.backbone.name!r} with backbone.kwargs {spec.backbone.kwargs or {}} cannot "
                        f"be built: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    method = methods()[spec.method.name](spec.method, backbone, spec.projector, spec.training.seed)
    converted = distributed.convert_batchnorm(method, device or torch.device("cpu"))
    if not isinstance(converted, Method):  # (only a batch-norm layer itself is replaced, never its parent)
        raise TypeError(f"converting {type(method).__name__}'s batch norm replaced the method itself")
    return converted


# Backbones up to this many parameters (0.12 GB in float32) are checked by a real forward pass on the CPU:
# milliseconds, where the meta device's first tensor operations import torch's reference kernels and sympy
# (about 1.3 s of the driver's start, and of `validate`). Larger ones pass through the meta device, without memory.
CPU_CHECK_PARAMETERS = 30_000_000


def check_backbone(spec: SpecBase) -> tuple[int, int]:
    """Before any trial: build the spec's backbone without memory (the meta device) and pass it a batch of the
    data set's shape (for real where it is small, `CPU_CHECK_PARAMETERS`), so that a backbone that cannot take
    these images (a ViT's `img_size`, say) is a SpecError naming the fields. Returns (feature dimension,
    parameters)."""
    channels, size = network_input(spec.data)
    spec = spec if spec.is_resolved else spec.resolve({})  # the backbone is never searched
    with torch.device("meta"):
        backbone = build_method(spec, channels, torch.device("cpu"), size).backbone
    parameters = sum(p.numel() for p in backbone.parameters())
    device = torch.device("cpu" if parameters <= CPU_CHECK_PARAMETERS else "meta")
    if device.type == "cpu":  # built again for real: a small backbone's initialisation takes milliseconds
        backbone = backbone_from_spec(spec.backbone, channels, size)
    with device, torch.no_grad():
        try:
            features = backbone(torch.zeros(2, channels, size, size))
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise SpecError(f"backbone.name {spec.backbone.name!r} does not take {channels} x {size} x {size} images "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); for a ViT set "
                            f"backbone.kwargs (timm: {{img_size: {size}}}; torchvision: {{image_size: {size}}})") from None
    dim = feature_dim(backbone)
    if tuple(features.shape) != (2, dim):
        raise SpecError(f"backbone.name {spec.backbone.name!r} gives features of shape {tuple(features.shape[1:])} "
                        f"where ssl-tune expects ({dim},): it needs pooled features")
    return dim, parameters
