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
    def step(self, closure=None):  # type: ignore[override]
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


def parameter_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay (and LARS adaptation) only on weight matrices and conv kernels."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(params: Iterable[nn.Parameter], name: str, *, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    groups = parameter_groups(params, weight_decay)
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
    main = build_optimizer((p for p in method.parameters() if id(p) not in own), o.name,
                           lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    return main, auxiliary


def warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float = 0.0):
    """LR multiplier per step: linear warm-up from 0, then cosine decay to `final_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
