"""What a method supplies to the shared loop: model pieces, loss and state."""

from __future__ import annotations

import abc
import copy
from typing import ClassVar, Generic, NamedTuple, TypeVar

import torch
from torch import nn

from ssl_tune.data.augment import ViewAugmentation, spec_views
from ssl_tune.spec import AugmentationSpec, MethodConfig, ProjectorSpec
from ssl_tune.models import feature_dim


class Diverged(RuntimeError):
    """Training cannot go on (a non-finite loss, a singular statistic): the run ends as diverged.

    The loop raises it for a non-finite epoch loss; a method may raise it from ``forward`` with a
    reason specific to its loss.
    """


def frozen_copy(*modules: nn.Module) -> nn.Sequential:
    """An EMA teacher/target: a copy of `modules` in sequence that receives no gradients."""
    copy_ = copy.deepcopy(nn.Sequential(*modules))
    copy_.requires_grad_(False)
    return copy_


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (same structure)."""
    for t, s in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


class StepOutput(NamedTuple):
    """The loss to minimise and the named terms to log (detached by the loop)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


# A method's own config class: `Twist(Method[TwistConfig])` reads `self.config.lam1` with its type.
ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class Method(nn.Module, abc.ABC, Generic[ConfigT]):
    """Base of every SSL method.

    Subclasses set ``name`` and ``Config`` (a `ssl_tune.spec.MethodConfig` subclass), build their
    heads in ``__init__`` and implement ``forward(views) -> StepOutput`` for this rank's rows of the
    global batch. A method sees its own config, the backbone, the shape of the shared projector
    section and the run's seed, never the whole spec: data, optimisation and evaluation belong to
    the shared loop. Losses that use batch statistics gather the global batch with
    `ssl_tune.distributed.gather_with_grad`. State that must survive a resume (memory banks,
    running covariances, EMA teachers) lives in buffers or sub-modules, so it is part of
    ``state_dict`` and of every checkpoint.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    num_views: ClassVar[int] = 2

    def __init__(self, config: ConfigT, backbone: nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__()
        self.config: ConfigT = config
        self.backbone = backbone
        self.feature_dim = feature_dim(backbone)  # the size of the backbone's features, what the heads take
        self.seed = seed

    def view_augmentations(self, augmentation: AugmentationSpec) -> list[ViewAugmentation]:
        """One augmentation per view, from the spec's `data.augmentation`."""
        return spec_views(augmentation, self.num_views)

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        """The loss of this rank's rows of the global batch, one tensor per view."""

    def auxiliary_optimizer(self) -> torch.optim.Optimizer | None:
        """An optimizer for parameters with their own update rule (SSL-HSIC's learned bandwidth).

        The loop leaves its parameters out of the spec's optimizer and learning-rate schedule,
        steps it after that one, and keeps its state in checkpoints. Called once per trainer.
        """
        return None

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Hook after each optimizer step (EMA updates). `progress` is the fraction of training
        steps done before this one: 0 at the first step, (T - 1) / T at the last."""
