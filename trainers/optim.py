"""Optimizers (SGD, LARS, AdamW) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ssl_tune.spec import SpecBase
    from trainers.base import Method


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    You et al., "Large Batch Training of Convolutional Networks", 2017. The trust ratio
    eta * ||w|| / (||g|| + wd * ||w||) scales each tensor's update; parameter groups with
    ``lars_exclude`` (biases, norm layers) get plain SGD without weight decay, as in BYOL.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]  # torch's overloads; the closure is accepted, not called
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


# Leaf names of the parameters ViTs exclude from weight decay besides biases and norms (1-d tensors):
# position embeddings, class, distillation and register tokens (timm's and torchvision's names), as
# DeiT, DINO and MAE do.
NO_DECAY_NAMES = frozenset({"pos_embed", "pos_embedding", "cls_token", "class_token", "dist_token", "reg_token",
                            "register_tokens", "absolute_pos_embed", "relative_position_bias_table"})


def no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of `model`'s parameters that get no weight decay (nor LARS adaptation): 1-d tensors
    (biases, norm scales), NO_DECAY_NAMES, and whatever a submodule's own `no_weight_decay()` lists (timm)."""
    names = {n for n, p in model.named_parameters() if p.ndim <= 1 or n.rsplit(".", 1)[-1] in NO_DECAY_NAMES}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed) and module is not model:
            names |= {f"{prefix}.{n}" for n in listed()}
    return names


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                     exclude: set[str]) -> list[dict]:
    """Weight decay (and LARS adaptation) on every trainable parameter but those named in `exclude`."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if name in exclude else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(groups: list[dict], name: str, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, lars, adamw")


def build_optimizers(method: Method, spec: SpecBase) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """The spec's optimizer over the method's parameters, and the method's auxiliary optimizer (or
    None) over the parameters it updates by its own rule, which the first one leaves out."""
    auxiliary = method.auxiliary_optimizer()
    own = {id(p) for group in (auxiliary.param_groups if auxiliary else []) for p in group["params"]}
    o = spec.optimizer
    groups = parameter_groups(((n, p) for n, p in method.named_parameters() if id(p) not in own), o.weight_decay,
                              no_weight_decay(method))
    main = build_optimizer(groups, o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return main, auxiliary


def warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float = 0.0):
    """LR multiplier per step: linear warm-up from 0, then cosine decay to `final_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
