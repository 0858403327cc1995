"""TWIST: Twin Class Distribution Estimation.

Wang et al., "Self-Supervised Learning by Estimating Twin Class Distributions", 2021
(https://arxiv.org/abs/2110.07402; official code bytedance/TWIST, `EntLoss`).

Both views go through backbone -> MLP -> affine-free BatchNorm, giving logits over C classes.
With p = softmax(logits) and q = softmax(logits / tau)::

    kl = (KL(p1 || p2) + KL(p2 || p1)) / 2           consistency between the views
    eh = (H(q1) + H(q2)) / 2,  H(q) = mean_n -sum_c q log q     sharp per-sample predictions
    he = (H(mean_n q1) + H(mean_n q2)) / 2                       uniform use of all classes
    loss = kl + (1 + lam1) * eh - lam2 * he

Under DDP the loss is that of the global batch (logits gathered with gradient), not the
official all-reduced sum of per-rank terms.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import Field
from torch import nn

from ssl_tune.distributed import gather_with_grad
from ssl_tune.models import mlp
from ssl_tune.spec import MethodConfig, ProjectorSpec, Searchable
from trainers.base import Method, StepOutput


class TwistConfig(MethodConfig):
    name: Literal["twist"] = "twist"
    lam1: Searchable[float] = Field(0.0, description="weight of the per-sample entropy is 1 + lam1")
    lam2: Searchable[float] = Field(1.0, description="weight of the entropy of the batch-mean distribution")
    tau: Searchable[Annotated[float, Field(gt=0)]] = Field(1.0, description="temperature of the entropy terms")
    eps: Annotated[float, Field(gt=0)] = 1e-5


class TwistLoss(NamedTuple):
    loss: torch.Tensor
    kl: torch.Tensor
    eh: torch.Tensor
    he: torch.Tensor


def twist_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    lam1: float = 0.0,
    lam2: float = 1.0,
    tau: float = 1.0,
    eps: float = 1e-5,
) -> TwistLoss:
    """TWIST loss of the post-BN logits (B x C) of two views; see the module docstring."""
    # Softmax and logs in at least float32, also under bf16/fp16 autocast.
    dtype = torch.promote_types(logits_a.dtype, torch.float32)
    logits_a, logits_b = logits_a.to(dtype), logits_b.to(dtype)
    p_a, p_b = logits_a.softmax(1), logits_b.softmax(1)
    log_a, log_b = (p_a + eps).log(), (p_b + eps).log()
    kl = 0.5 * (((p_a * (log_a - log_b)).sum(1).mean()) + ((p_b * (log_b - log_a)).sum(1).mean()))

    def per_sample_entropy(q: torch.Tensor) -> torch.Tensor:
        return -(q * (q + eps).log()).sum(1).mean()

    def entropy_of_mean(q: torch.Tensor) -> torch.Tensor:
        q_bar = q.mean(0)
        return -(q_bar * (q_bar + eps).log()).sum()

    q_a, q_b = (logits_a / tau).softmax(1), (logits_b / tau).softmax(1)
    eh = 0.5 * (per_sample_entropy(q_a) + per_sample_entropy(q_b))
    he = 0.5 * (entropy_of_mean(q_a) + entropy_of_mean(q_b))
    return TwistLoss(kl + (1 + lam1) * eh - lam2 * he, kl, eh, he)


class Twist(Method[TwistConfig]):
    name = "twist"
    Config = TwistConfig

    def __init__(self, config: TwistConfig, backbone: nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        p = projector
        self.head = nn.Sequential(
            mlp(self.feature_dim, p.hidden_dim, p.output_dim, p.num_layers),
            nn.BatchNorm1d(p.output_dim, affine=False),
        )

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        n = views[0].shape[0]
        # One pass over both views: BatchNorm statistics are then those of both views together,
        # as in the official code, which concatenates the crops.
        logits = self.head(self.backbone(torch.cat(views)))
        c = self.config
        out = twist_loss(
            gather_with_grad(logits[:n]), gather_with_grad(logits[n:]), lam1=c.lam1, lam2=c.lam2, tau=c.tau, eps=c.eps
        )
        return StepOutput(out.loss, {"kl": out.kl, "eh": out.eh, "he": out.he})


METHOD = Twist
