"""Backbones and MLP heads shared by all methods."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks (width, 2x, 4x channels) and global average pooling: fast on a CPU."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
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


def build_backbone(name: str, in_channels: int, *, width: int = 32, cifar_stem: bool = True) -> nn.Module:
    """A backbone mapping images to pooled features; `.output_dim` is the feature size."""
    if name == "small_cnn":
        return SmallCNN(in_channels, width)
    import torchvision

    if name not in ("resnet18", "resnet50"):
        raise ValueError(f"unknown backbone {name!r}; allowed: small_cnn, resnet18, resnet50")
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    net.output_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


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
