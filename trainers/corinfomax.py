"""CorInfoMax: correlative information maximisation.

Ozsoy et al., "Self-Supervised Learning with an Information Maximization Criterion", NeurIPS 2022
(https://arxiv.org/abs/2209.07999; official code serdarozsoy/corinfomax-ssl, `CovarianceLoss`).

Each view goes through backbone -> projector (Linear + ReLU layers, the last Linear without bias)
on its own, as in the official code; the outputs z1, z2 (N x D) are L2-normalised. Each view i
keeps a running mean mu_i and covariance R_i (float64; mu_i = 0 and R_i = R_ini * I at the start).
A training step::

    mu_i <- la_mu * mu_i + (1 - la_mu) * mean_n z_i
    R_i  <- la_R * R_i + (1 - la_R) * (z_i - mu_i)^T (z_i - mu_i) / N     (with the new mu_i)
    cov  = -[logdet(R_1 + eps I) + logdet(R_2 + eps I)] / D              spread over all directions
    sim  = mean over the N*D elements of (z_1 - z_2)^2                   agreement of the views
    loss = alpha * sim + cov

Gradients flow through this batch's contribution only; the stored state is detached after each
step. Under DDP, z is the gathered global batch (N = global batch size), so every rank holds the
same state. Unlike the official code, the state is kept in buffers: checkpoints carry it and a
resumed run continues exactly.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_tune.distributed import gather_with_grad
from ssl_tune.evaluation import effective_rank
from ssl_tune.models import mlp
from ssl_tune.spec import MethodConfig, ProjectorSpec, Searchable
from trainers.base import Diverged, Method, StepOutput


class CorInfoMaxConfig(MethodConfig):
    name: Literal["corinfomax"] = "corinfomax"
    alpha: Searchable[Annotated[float, Field(gt=0)]] = Field(250.0, description="weight of the view-agreement (MSE) term")
    eps: Searchable[Annotated[float, Field(gt=0)]] = Field(1e-8, description="log-det epsilon: logdet(R + eps*I)")
    la_R: Searchable[Annotated[float, Field(ge=0, lt=1)]] = Field(0.01, description="forgetting factor of the running covariance")
    la_mu: Searchable[Annotated[float, Field(ge=0, lt=1)]] = Field(0.01, description="forgetting factor of the running mean")
    R_ini: Annotated[float, Field(gt=0)] = Field(1.0, description="the running covariance starts as R_ini * I")
    projector_batch_norm: bool = Field(False, description="BatchNorm in the projector (official: only for ImageNet-1k)")


class CorInfoMaxTerms(NamedTuple):
    loss: torch.Tensor
    cov: torch.Tensor
    sim: torch.Tensor


class CorInfoMaxLoss(nn.Module):
    """alpha * MSE(z1, z2) - [logdet(R1 + eps I) + logdet(R2 + eps I)] / D with running (R_i, mu_i).

    ``forward(z1, z2)`` takes the L2-normalised N x D outputs of the two views (the global batch
    under DDP). In training mode it also updates the state; in eval mode it leaves it unchanged.
    The log-determinants go through a Cholesky factorisation in float64; a matrix that is not
    positive definite raises `Diverged` with the reason instead of returning NaN.
    """

    R1: torch.Tensor  # buffers (registered below): each view's running covariance and mean
    R2: torch.Tensor
    mu1: torch.Tensor
    mu2: torch.Tensor

    def __init__(self, dim: int, *, alpha: float, eps: float, la_R: float, la_mu: float, R_ini: float = 1.0) -> None:
        super().__init__()
        self.dim, self.alpha, self.eps, self.la_R, self.la_mu = dim, alpha, eps, la_R, la_mu
        for view in (1, 2):
            self.register_buffer(f"R{view}", R_ini * torch.eye(dim, dtype=torch.float64))
            self.register_buffer(f"mu{view}", torch.zeros(dim, dtype=torch.float64))

    def _updated_state(self, z: torch.Tensor, mu: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = z.to(torch.float64)
        new_mu = self.la_mu * mu + (1 - self.la_mu) * z.mean(0)
        centred = z - new_mu
        new_R = self.la_R * R + (1 - self.la_R) * (centred.T @ centred) / z.shape[0]
        return new_mu, new_R

    def _logdet(self, R: torch.Tensor, name: str) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=R.dtype, device=R.device)
        cholesky, info = torch.linalg.cholesky_ex(R + self.eps * eye)
        if info.item() != 0:
            finite = bool(torch.isfinite(R).all())
            raise Diverged(
                f"CorInfoMax: {name} + eps*I is not positive definite (eps={self.eps:g}); "
                + ("increase method.eps or method.la_R" if finite else "the projector output is non-finite")
            )
        return 2 * cholesky.diagonal().log().sum()

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> CorInfoMaxTerms:
        mu1, R1 = self._updated_state(z1, self.mu1, self.R1)
        mu2, R2 = self._updated_state(z2, self.mu2, self.R2)
        dtype = torch.promote_types(z1.dtype, torch.float32)
        cov = (-(self._logdet(R1, "R1") + self._logdet(R2, "R2")) / self.dim).to(dtype)
        sim = F.mse_loss(z1.to(dtype), z2.to(dtype))
        if self.training:
            with torch.no_grad():
                for buffer, value in ((self.mu1, mu1), (self.R1, R1), (self.mu2, mu2), (self.R2, R2)):
                    buffer.copy_(value)
        return CorInfoMaxTerms(self.alpha * sim + cov, cov, sim)


class CorInfoMax(Method[CorInfoMaxConfig]):
    name = "corinfomax"
    Config = CorInfoMaxConfig

    def __init__(self, config: CorInfoMaxConfig, backbone: nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        p, c = projector, self.config
        self.projector = mlp(self.feature_dim, p.hidden_dim, p.output_dim, p.num_layers,
                             batch_norm=c.projector_batch_norm, last_bias=False)
        self.criterion = CorInfoMaxLoss(p.output_dim, alpha=c.alpha, eps=c.eps, la_R=c.la_R, la_mu=c.la_mu, R_ini=c.R_ini)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        z1, z2 = (gather_with_grad(F.normalize(self.projector(self.backbone(v)), dim=1)) for v in views)
        out = self.criterion(z1, z2)
        return StepOutput(out.loss, {"cov": out.cov, "sim": out.sim, "effective_rank": effective_rank(z1.detach())})


METHOD = CorInfoMax
