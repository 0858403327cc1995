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


# --- backbones by name -----------------------------------------------------------------------------

VIT_TINY_28 = {"name": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 28, "patch_size": 4}}


@pytest.mark.parametrize("name,kwargs,dim", [
    ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 192),
    ("vit_b_16", {"image_size": 32}, 768),
    ("mobilenet_v3_small", {}, 1024),
    ("convnext_tiny", {}, 768),
])
def test_torchvision_and_timm_models_give_pooled_features_of_the_inferred_size(name, kwargs, dim):
    net = build_backbone(name, in_channels=1, kwargs=kwargs).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, dim) and net.output_dim == dim


def test_cifar_stem_auto_is_the_cifar_stem_up_to_64_px_for_resnets_only():
    from ssl_tune.models import resolve_cifar_stem
    from ssl_tune.spec import BackboneSpec

    resnet, vit = BackboneSpec(name="resnet50"), BackboneSpec(**VIT_TINY_28)
    assert resolve_cifar_stem(resnet, 32) and resolve_cifar_stem(resnet, 64)
    assert not resolve_cifar_stem(resnet, 96) and not resolve_cifar_stem(resnet, 224)
    assert not resolve_cifar_stem(vit, 28)
    assert not resolve_cifar_stem(BackboneSpec(name="resnet50", cifar_stem=False), 32)
    with pytest.raises(ValueError, match="ResNets only"):
        BackboneSpec(name="convnext_tiny", cifar_stem=True)


def test_vit_position_embeddings_tokens_norms_and_biases_get_no_weight_decay():
    from ssl_tune.spec.files import spec_from_dict
    from tests.conftest import tiny_spec_dict
    from trainers.build import build_method
    from trainers.optim import build_optimizers

    for optimizer in ("adamw", "lars"):
        spec = spec_from_dict(tiny_spec_dict(backbone=VIT_TINY_28, optimizer={"name": optimizer, "lr": 1e-3,
                                                                               "weight_decay": 0.05}))
        method = build_method(spec, in_channels=1)
        main, _ = build_optimizers(method, spec)
        decayed = {id(p) for g in main.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        names = {n for n, p in method.named_parameters() if id(p) in decayed}
        for excluded in ("backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "backbone.blocks.0.norm1.weight",
                         "backbone.blocks.0.attn.qkv.bias"):
            assert excluded not in names, (optimizer, excluded)
        assert {"backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight"} <= names
        if optimizer == "lars":
            assert all(g["lars_exclude"] == (g["weight_decay"] == 0) for g in main.param_groups)


@pytest.mark.parametrize("cpu_limit", [0, 30_000_000], ids=["meta device", "cpu"])
def test_the_backbone_check_sees_the_same_shapes_on_the_meta_device_and_the_cpu(monkeypatch, cpu_limit):
    """Small backbones are checked by a real forward pass (no import of torch's meta kernels), large ones
    on the meta device: both give the feature size and parameters, and both refuse images a ViT cannot take."""
    from ssl_tune.spec import SpecError
    from ssl_tune.spec.files import spec_from_dict
    from tests.conftest import tiny_spec_dict
    from trainers import build

    monkeypatch.setattr(build, "CPU_CHECK_PARAMETERS", cpu_limit)
    raw = tiny_spec_dict()
    net = build_backbone("small_cnn", in_channels=1, width=raw["backbone"]["width"])
    assert build.check_backbone(spec_from_dict(raw)) == (net.output_dim, sum(p.numel() for p in net.parameters()))
    raw["backbone"] = {"name": "timm:vit_tiny_patch16_224"}  # img_size 224, given 28 x 28 images
    with pytest.raises(SpecError, match="does not take 1 x 28 x 28 images"):
        build.check_backbone(spec_from_dict(raw))
