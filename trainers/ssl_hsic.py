"""SSL-HSIC: self-supervised learning with kernel dependence maximisation.

Li et al., "Self-Supervised Learning with Kernel Dependence Maximization", NeurIPS 2021
(https://arxiv.org/abs/2106.08320; official code deepmind/ssl_hsic, JAX, `kernels.HSICLoss`).

The loss sees k L2-normalised views h_1..h_k (B x D), row i of each from image i: with the EMA
target network (default) the online predictions of views 1, 2 and the target projections of views
2, 1 (k = 4); without it the online predictions (k = 2). With the inverse multiquadric kernel
kappa(x, y) = c / sqrt(||x - y||^2 + c^2) of bandwidth c, K over all n = B*k rows, H = I - 1/n and
"same(a, b)" meaning rows a and b come from one image (a = b included)::

    hsic_xy = sum_{a,b same} K_ab / (B k (k-1))  -  sum_{a,b} K_ab / n^2     dependence on the image
    hsic_xx = ||H K H||_F^2 / n^2                                          spread of the embedding
    loss    = gamma * sqrt(hsic_xx) - hsic_xy

Training uses the official random-feature estimators (cost linear in B):
phi(x) = sqrt(2/F) cos((x / c) W^T + b) with W drawn from the IMQ kernel's spectral density and
b ~ U[0, 2 pi); hsic_xy from one draw, hsic_xx = ||Phi_1c^T Phi_2c||_F^2 / n^2 from two independent
draws (centred over all n rows). Both are unbiased for the exact values. The IMQ spectral density is
sampled exactly as a Gaussian scale mixture, w = |s| g with s ~ N(0, 1), g ~ N(0, I_D), since
(1 + ||u||^2)^(-1/2) = E_{t ~ chi2(1)} exp(-t ||u||^2 / 2); the official code samples the radial
density r^((D-1)/2) K_{(D-1)/2}(r) on a grid, which has the same law.

The HSIC terms see c as a constant. It is fixed (searched) or learned as in the official code: a
separate Adam maximises 0.5 * mean log (d kappa / d ||x - y||^2)^2 over random pairs of rows (the
official `jax.grad` differentiates with respect to its first argument, the squared distance; the
optimum is near c^2 = mean distance / 2, a median-style bandwidth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_tune.distributed import gather_with_grad
from ssl_tune.models import mlp
from ssl_tune.spec import MethodConfig, ProjectorSpec, Searchable
from trainers.base import Method, StepOutput, ema_update, frozen_copy

RandomFeatures = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class SSLHSICConfig(MethodConfig):
    name: Literal["ssl_hsic"] = "ssl_hsic"
    gamma: Searchable[Annotated[float, Field(ge=0)]] = Field(3.0, description="weight of sqrt(hsic_xx)")
    bandwidth: Searchable[Annotated[float, Field(gt=0)]] = Field(
        1.0, description="IMQ kernel bandwidth c (its initial value when learned)")
    learn_bandwidth: bool = Field(True, description="learn c by the official gradient-norm objective")
    bandwidth_lr: Annotated[float, Field(gt=0)] = Field(3e-4, description="Adam learning rate of the learned bandwidth")
    bandwidth_samples: Annotated[int, Field(ge=2)] = Field(1024, description="rows sampled for the bandwidth objective")
    estimator: Literal["rff", "exact"] = Field("rff", description="rff: random features, linear in the batch; exact: quadratic")
    num_rff_features: Annotated[int, Field(ge=1)] = Field(512, description="F, random features per draw")
    target_network: bool = Field(True, description="EMA target network: the loss sees 4 views instead of 2")
    target_momentum: Searchable[Annotated[float, Field(ge=0, le=1)]] = Field(
        0.99, description="EMA momentum of the target at the start; it rises to 1 on a cosine")


class HSICLoss(NamedTuple):
    loss: torch.Tensor
    hsic_xy: torch.Tensor
    hsic_xx: torch.Tensor


def imq_kernel(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """kappa(x_a, y_b) = c / sqrt(||x_a - y_b||^2 + c^2) for every pair of rows."""
    return scale / (squared_distances(x, y) + scale**2).sqrt()


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return sq.clamp_min(0.0)  # rounding can make a zero distance slightly negative


def imq_random_features(
    num_features: int, dim: int, *, generator: torch.Generator | None = None, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies W (F x D) from the IMQ kernel's spectral density (for unit bandwidth) and phases b (1 x F)."""
    kwargs = dict(generator=generator, device=device, dtype=dtype)
    directions = torch.randn(num_features, dim, **kwargs)
    amplitude = torch.randn(num_features, 1, **kwargs).abs()
    phases = torch.rand(1, num_features, **kwargs) * (2 * math.pi)
    return directions * amplitude, phases


def _features(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return math.sqrt(2 / w.shape[0]) * torch.cos((x / scale) @ w.T + b)


def hsic_loss(
    views: Sequence[torch.Tensor],
    *,
    gamma: float,
    scale: torch.Tensor | float,
    rff: RandomFeatures | None = None,
) -> HSICLoss:
    """SSL-HSIC loss of k L2-normalised views (each B x D); see the module docstring.

    `scale` is the IMQ bandwidth c, used as a constant. `rff=None` gives the exact estimators
    (an n x n kernel, n = B*k); `rff=(w1, b1, w2, b2)` the random-feature ones with those
    frequencies (F x D) and phases (1 x F): hsic_xy from (w1, b1), hsic_xx from both draws.
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.detach()
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    views = [v.to(dtype) for v in views]
    k, batch = len(views), views[0].shape[0]
    n = batch * k
    if rff is None:
        x = torch.cat(views)
        K = imq_kernel(x, x, scale)
        # K viewed as (view, image, view, image): the image-diagonal holds the same-image pairs.
        same = K.view(k, batch, k, batch).diagonal(dim1=1, dim2=3).sum()
        hsic_xy = same / (batch * k * (k - 1)) - K.sum() / n**2
        centred = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
        hsic_xx = (centred**2).sum() / n**2
    else:
        w1, b1, w2, b2 = (t.to(dtype) for t in rff)
        phi1 = [_features(v, w1, b1, scale) for v in views]
        per_image = torch.stack(phi1).sum(0)  # B x F: sum over the views of each image
        total = per_image.sum(0)
        hsic_xy = (per_image**2).sum() / (batch * k * (k - 1)) - (total**2).sum() / n**2
        all1 = torch.cat(phi1)
        all2 = torch.cat([_features(v, w2, b2, scale) for v in views])
        cross = (all1 - all1.mean(0)).T @ (all2 - all2.mean(0))  # F x F
        hsic_xx = (cross**2).sum() / n**2
    return HSICLoss(gamma * hsic_xx.sqrt() - hsic_xy, hsic_xy, hsic_xx)


def bandwidth_objective(views: Sequence[torch.Tensor], scale: torch.Tensor, num_samples: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The official kernel-parameter loss, -0.5 * mean log (d kappa / d dist^2)^2, over all pairs
    of two random samples of rows (`num_samples` in total over the views, drawn with replacement).
    Only `scale` receives a gradient."""
    batch, per_view = views[0].shape[0], max(1, num_samples // len(views))

    def sample() -> torch.Tensor:
        idx = torch.randint(0, batch, (len(views), per_view), generator=generator, device=views[0].device)
        return torch.cat([v.detach()[i] for v, i in zip(views, idx)]).float()

    dist = squared_distances(sample(), sample())
    derivative = -scale / (2 * (dist + scale**2) ** 1.5)
    return -0.5 * (derivative**2).clamp_min(1e-14).log().mean()


class SSLHSIC(Method[SSLHSICConfig]):
    name = "ssl_hsic"
    Config = SSLHSICConfig

    draws: torch.Tensor  # a buffer: the random-feature draws so far (a resumed run draws the next ones)

    def __init__(self, config: SSLHSICConfig, backbone: nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        p, c = projector, self.config
        self.projector = mlp(self.feature_dim, p.hidden_dim, p.output_dim, p.num_layers)
        self.predictor = mlp(p.output_dim, p.hidden_dim, p.output_dim, 2)
        self.target: nn.Module | None = None
        if c.target_network:
            self.target = frozen_copy(self.backbone, self.projector)
        bandwidth = torch.tensor(float(c.bandwidth))
        if c.learn_bandwidth:
            self.bandwidth = nn.Parameter(bandwidth)
        else:
            self.register_buffer("bandwidth", bandwidth)
        # Random features and sampled pairs come from a generator seeded by (seed, draw), so every
        # DDP rank draws the same ones and a resumed run draws what it would have drawn.
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def auxiliary_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.config.learn_bandwidth:
            return None
        return torch.optim.Adam([self.bandwidth], lr=self.config.bandwidth_lr, betas=(0.9, 0.999), eps=1e-8)

    def _generator(self, device: torch.device) -> torch.Generator:
        seed = self.seed * 1_000_003 + int(self.draws)
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        c = self.config
        predictions = [self.predictor(self.projector(self.backbone(v))) for v in views]
        hiddens = list(predictions)
        if self.target is not None:
            with torch.no_grad():
                hiddens += [self.target(v) for v in reversed(views)]
        hiddens = [gather_with_grad(F.normalize(h, dim=1)) for h in hiddens]
        generator = self._generator(hiddens[0].device)
        rff = None
        if c.estimator == "rff":
            dim = hiddens[0].shape[1]
            draw = dict(generator=generator, device=hiddens[0].device)
            rff = (*imq_random_features(c.num_rff_features, dim, **draw), *imq_random_features(c.num_rff_features, dim, **draw))
        out = hsic_loss(hiddens, gamma=c.gamma, scale=self.bandwidth, rff=rff)
        loss = out.loss
        if c.learn_bandwidth:
            objective = bandwidth_objective(hiddens, self.bandwidth, c.bandwidth_samples, generator)
            # Adds the bandwidth's gradient without changing the loss value that is logged.
            loss = loss + (objective - objective.detach())
        if self.training:
            self.draws += 1
        terms = {"hsic_xy": out.hsic_xy.detach(), "hsic_xx": out.hsic_xx.detach(), "bandwidth": self.bandwidth.detach()}
        return StepOutput(loss, terms)

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        if self.target is None:
            return
        # BYOL's schedule, used by the official code: 1 - (1 - base) * (cos(pi * progress) + 1) / 2.
        m = 1 - (1 - self.config.target_momentum) * (math.cos(math.pi * progress) + 1) / 2
        ema_update(self.target, nn.Sequential(self.backbone, self.projector), m)


METHOD = SSLHSIC
