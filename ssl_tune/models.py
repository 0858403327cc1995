"""Backbones by name, and the MLP heads shared by all methods.

`backbone.name` is one of three kinds, each built with random weights (nothing is downloaded):

* ``small_cnn``: three conv blocks, fast on a CPU;
* any torchvision classification model (``resnet50``, ``vit_b_16``, ``convnext_tiny``, ...), built with
  ``weights=None``; its classifier's last Linear layer is removed;
* ``timm:NAME`` (``timm:vit_small_patch16_224``), built with ``num_classes=0``, which makes timm return
  pooled features.

`backbone.kwargs` goes to the constructor (``{img_size: 32, patch_size: 4}`` for a ViT on small images).
Every backbone maps N x C x H x W images to N x `output_dim` features; `output_dim` is read off the
model, so the methods' projectors are sized from it.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from torch import nn


class BackboneSettings(Protocol):
    """What a spec's `backbone` section holds (`ssl_tune.spec.BackboneSpec`)."""

    name: str
    kwargs: dict[str, Any]
    width: int
    cifar_stem: Literal["auto"] | bool

TIMM_PREFIX = "timm:"
# `backbone.cifar_stem: auto`: ResNets take inputs up to this size with the CIFAR stem (3x3 stride-1 conv,
# no max-pool), larger ones with the ImageNet stem. The ImageNet stem on 32-px images leaves a 1x1 map
# after the stem's 4x downsampling and the stages' 8x; the CIFAR stem on 224 px costs ResNet-50 about 16x the
# compute (127 against 8.2 GFLOP an image).
CIFAR_STEM_MAX_SIZE = 64
# Torchvision's ResNet family: the models `cifar_stem` applies to.
RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
# torchvision names the classification head of each model one of these.
CLASSIFIER_ATTRIBUTES = ("fc", "classifier", "heads", "head")


class SmallCNN(nn.Module):
    """Three conv blocks (width, 2x, 4x channels) and global average pooling: fast on a CPU."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                       nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(
            *block(in_channels, width, True),
            *block(width, 2 * width, True),
            *block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.output_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_name(name: str) -> None:
    """ValueError saying what is allowed when `name` is no backbone ssl-tune can build."""
    if name == "small_cnn":
        return
    if name.startswith(TIMM_PREFIX):
        import timm

        if not timm.is_model(name.removeprefix(TIMM_PREFIX)):
            raise ValueError(f"{name!r} is not a timm model (timm.list_models() lists them, e.g. "
                             "timm:vit_small_patch16_224, timm:resnet50)")
        return
    if name not in torchvision_names():
        raise ValueError(f"unknown backbone {name!r}; allowed: small_cnn, a torchvision classification model "
                         "(resnet18, resnet50, vit_b_16, convnext_tiny, ...: torchvision.models.list_models()) "
                         "or timm:NAME (timm:vit_small_patch16_224)")


def is_resnet(name: str) -> bool:
    return name.startswith(RESNET_PREFIXES)


def resolve_cifar_stem(backbone: BackboneSettings, image_size: int) -> bool:
    """`backbone.cifar_stem` as built: auto is the CIFAR stem for ResNets up to CIFAR_STEM_MAX_SIZE px."""
    if backbone.cifar_stem == "auto":
        return is_resnet(backbone.name) and image_size <= CIFAR_STEM_MAX_SIZE
    return bool(backbone.cifar_stem)


def backbone_from_spec(backbone: BackboneSettings, in_channels: int, image_size: int) -> nn.Module:
    """The backbone a spec's `backbone` section describes, for images of `in_channels` x `image_size` px."""
    return build_backbone(backbone.name, in_channels, width=backbone.width,
                          cifar_stem=resolve_cifar_stem(backbone, image_size), kwargs=backbone.kwargs)


def feature_dim(backbone: nn.Module) -> int:
    """A backbone's feature size: the `output_dim` every backbone carries (`build_backbone`). (Read from the
    instance's own attributes: nn.Module types every other attribute as a tensor or a module.)"""
    return int(vars(backbone)["output_dim"])


def build_backbone(name: str, in_channels: int, *, width: int = 32, cifar_stem: bool = False,
                   kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A backbone mapping images to pooled features; `.output_dim` is the feature size."""
    kwargs = dict(kwargs or {})
    if name == "small_cnn":
        return SmallCNN(in_channels, width, **kwargs)
    if name.startswith(TIMM_PREFIX):
        import timm

        net = timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False,
                                **{"num_classes": 0, "in_chans": in_channels, **kwargs})
        net.output_dim = getattr(net, "head_hidden_size", None) or net.num_features
        return net
    import torchvision

    check_name(name)
    if name in ("googlenet", "inception_v3"):  # their auxiliary classifiers make training return tuples
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    if is_resnet(name) and cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif cifar_stem:
        raise ValueError(f"backbone.cifar_stem applies to ResNets only, not {name!r}: set it to auto or false")
    elif in_channels != 3:
        _replace_first_conv(net, in_channels)
    net.output_dim = _remove_classifier(net, name)
    return net


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Give the model's first convolution `in_channels` inputs (torchvision's take RGB)."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
            new = nn.Conv2d(in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride), padding,
                            _pair(conv.dilation), conv.groups, conv.bias is not None, conv.padding_mode)
            net.set_submodule(name, new)
            return


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    return value[0], value[1]


def _remove_classifier(net: nn.Module, name: str) -> int:
    """Replace the last Linear layer of torchvision's classification head with Identity; returns its input size."""
    for attribute in CLASSIFIER_ATTRIBUTES:
        head = getattr(net, attribute, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(net, attribute, nn.Identity())
            return head.in_features
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            inner, last = linears[-1]
            head.set_submodule(inner, nn.Identity())
            return last.in_features
    raise ValueError(f"torchvision model {name!r} has no Linear classifier to remove (in {', '.join(CLASSIFIER_ATTRIBUTES)}); "
                     "use another model or timm:NAME")


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    *,
    batch_norm: bool = True,
    last_bias: bool = True,
) -> nn.Sequential:
    """`num_layers` Linear layers; every one but the last is followed by (BN and) ReLU."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=last_bias))
    return nn.Sequential(*layers)
