"""ISD: Iterative Similarity Distillation.

Tejankar et al., "ISD: Self-Supervised Learning by Iterative Similarity Distillation", ICCV 2021
(https://arxiv.org/abs/2012.09259; official code UMBCvision/ISD, `ISD` and `KLD`).

The student (backbone -> projector -> predictor) sees a strong view, the teacher (an EMA copy of
backbone -> projector, no gradients) a weak one. Both are compared with a memory bank of K earlier
teacher keys (unit rows); the student's similarity distribution over the bank is pulled towards the
teacher's::

    q = normalize(student(strong)),  k = normalize(teacher(weak))
    loss = mean_batch KL(softmax(k Q^T / t_teacher) || softmax(q Q^T / t_student))

The current batch is enqueued only after the loss, so it is never its own anchor. "plus" (the
default) has separate temperatures; "v1" uses t_teacher for both.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ssl_tune.data.augment import spec_views
from ssl_tune.distributed import gather, gather_with_grad
from ssl_tune.models import mlp
from ssl_tune.spec import AugmentationSpec, MethodConfig, ProjectorSpec, Searchable
from trainers.base import Method, StepOutput, ema_update, frozen_copy


class ISDConfig(MethodConfig):
    name: Literal["isd"] = "isd"
    variant: Literal["plus", "v1"] = Field("plus", description="plus: separate temperatures; v1: t_teacher for both")
    t_teacher: Searchable[Annotated[float, Field(gt=0)]] = Field(0.02, description="teacher temperature")
    t_student: Searchable[Annotated[float, Field(gt=0)]] = Field(0.2, description="student temperature (plus)")
    momentum: Searchable[Annotated[float, Field(ge=0, lt=1)]] = Field(0.99, description="EMA momentum of the teacher")
    bank_size: Annotated[int, Field(ge=1)] = Field(4096, description="K, a multiple of the global batch size")
    teacher_view: Literal["weak", "strong"] = Field("weak", description="weak: crop + flip only for the teacher")

    def check_spec(self, spec) -> None:
        if self.bank_size % spec.training.batch_size:
            raise ValueError(f"method.bank_size ({self.bank_size}) must be a multiple of training.batch_size "
                             f"({spec.training.batch_size}): the bank takes whole global batches")


class ISDLoss(NamedTuple):
    loss: torch.Tensor
    teacher_entropy: torch.Tensor  # mean entropy of the teacher's similarity distribution (a diagnostic)


def isd_loss(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, *,
             t_student: float, t_teacher: float) -> ISDLoss:
    """KL(softmax(sim_teacher) || softmax(sim_student)) summed over the K anchors, averaged over the batch.

    `student` and `teacher` are un-normalised B x D outputs (student predictor, teacher projector);
    `bank` is K x D with unit rows. Gradients flow only into `student`.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    bank = bank.detach().to(dtype)
    q = F.normalize(student.to(dtype), dim=1)
    k = F.normalize(teacher.detach().to(dtype), dim=1)
    log_p_student = (q @ bank.T / t_student).log_softmax(dim=1)
    log_p_teacher = (k @ bank.T / t_teacher).log_softmax(dim=1)
    p_teacher = log_p_teacher.exp()
    loss = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    entropy = -(p_teacher * log_p_teacher).sum(dim=1).mean()
    return ISDLoss(loss, entropy)


class ISD(Method[ISDConfig]):
    name = "isd"
    Config = ISDConfig

    bank: torch.Tensor  # buffers (registered in __init__): the memory bank of teacher keys, and where it writes next
    bank_ptr: torch.Tensor

    def __init__(self, config: ISDConfig, backbone: nn.Module, projector: ProjectorSpec, seed: int = 0) -> None:
        super().__init__(config, backbone, projector, seed)
        p = projector
        self.projector = mlp(self.feature_dim, p.hidden_dim, p.output_dim, p.num_layers)
        self.predictor = mlp(p.output_dim, p.hidden_dim, p.output_dim, 2)
        self.teacher = frozen_copy(self.backbone, self.projector)
        self.register_buffer("bank", F.normalize(torch.randn(self.config.bank_size, p.output_dim), dim=1))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    def view_augmentations(self, aug: AugmentationSpec):
        """View 0 (student): the preset's first view; view 1 (teacher): weak, or the preset's second."""
        strong = spec_views(aug)
        weak = spec_views(aug, weak=True)
        return [strong[0], weak[1] if self.config.teacher_view == "weak" else strong[1]]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest rows of the bank with `keys` (a whole global batch, unit rows)."""
        ptr, n = int(self.bank_ptr), keys.shape[0]
        self.bank[ptr : ptr + n] = keys.to(self.bank.dtype)
        self.bank_ptr.fill_((ptr + n) % self.bank.shape[0])

    def forward(self, views: list[torch.Tensor]) -> StepOutput:
        strong, weak = views
        student = self.predictor(self.projector(self.backbone(strong)))
        with torch.no_grad():
            keys = F.normalize(self.teacher(weak).float(), dim=1)
        all_keys = gather(keys)
        c = self.config
        t_student = c.t_teacher if c.variant == "v1" else c.t_student
        out = isd_loss(gather_with_grad(student), all_keys, self.bank.clone(), t_student=t_student, t_teacher=c.t_teacher)
        if self.training:
            self.enqueue(all_keys)
        return StepOutput(out.loss, {"teacher_entropy": out.teacher_entropy.detach()})

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        # The official code updates the teacher right before its forward pass; doing it right after
        # the optimizer step gives the same sequence of teachers (the first update is a no-op).
        m = self.config.momentum
        ema_update(self.teacher, nn.Sequential(self.backbone, self.projector), m)


METHOD = ISD
