"""Backbones: output sizes, CIFAR stem, grey input."""

import pytest
import torch

from ssl_tune.models import build_backbone, mlp


@pytest.mark.parametrize("name,dim", [("small_cnn", 64), ("resnet18", 512), ("resnet50", 2048)])
def test_backbones_map_images_to_pooled_features(name, dim):
    net = build_backbone(name, in_channels=1, width=16, cifar_stem=True).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, dim) and net.output_dim == dim


def test_cifar_stem_keeps_resolution_and_imagenet_stem_downsamples():
    cifar = build_backbone("resnet18", 3, cifar_stem=True)
    imagenet = build_backbone("resnet18", 3, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)


def test_mlp_layers():
    head = mlp(8, 16, 4, 3, batch_norm=True, last_bias=False)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 4] and linears[-1].bias is None
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head) == 2
