"""Global-batch helpers for DDP: losses that use batch statistics must see every rank's samples.

Gradient convention: every rank computes the same global-batch loss L. Backward through torch's
autograd-aware functional collectives sums each rank's gradient contribution (W * dL/dx for the
local x), and DDP then averages parameter gradients over the W ranks, which gives exactly dL/dtheta: the
gradient of one process on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# torch's autograd-aware collectives; torch.distributed.nn.functional, their older home, is deprecated
# in favour of this module.
import torch.distributed._functional_collectives as collectives
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _world() -> dist.ProcessGroup:
    """The default process group (there is one once `is_distributed()`)."""
    group = dist.group.WORLD
    if group is None:
        raise RuntimeError("torch.distributed has no default process group")
    return group


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (equally many rank-local rows) from all ranks in rank order, keeping gradients:
    the backward pass sums every rank's gradient for this rank's rows (torch's autograd collectives)."""
    if not is_distributed():
        return x
    return collectives.all_gather_tensor_autograd(x.contiguous(), 0, _world())


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized rank-local rows from all ranks (no gradient)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_uneven(x: torch.Tensor) -> torch.Tensor:
    """`gather` for rank-local row counts that may differ (feature extraction shards)."""
    if not is_distributed():
        return x
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = gather(count).tolist()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return torch.cat([part[:n] for part, n in zip(gather(padded).split(max(counts)), counts)])


@torch.no_grad()
def gather_to_first(x: torch.Tensor) -> torch.Tensor | None:
    """Rank-local rows (counts may differ) concatenated in rank order on rank 0; None on the others.
    Only rank 0 holds the result (a feature bank: 1.28M x 2048 floats is 10.5 GB)."""
    if not is_distributed():
        return x
    counts = gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]) if parts is not None else None


def broadcast_from_first(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; the others wait for it."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (rank 0 reports for everyone)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch: statistics are all-reduced (with gradient) across ranks.

    For CPU (gloo), where `nn.SyncBatchNorm` does not run; `convert_batchnorm` uses SyncBatchNorm on
    CUDA. The variance is computed in two passes (the global mean first, then the mean squared
    deviation from it), which stays accurate when the mean is large against the spread, unlike
    E[x^2] - E[x]^2. Single-process or in eval mode it is plain BatchNorm, so a model behaves the
    same with 1 or W ranks.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
        local_count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        sums = collectives.all_reduce(torch.cat([xf.sum(dims), local_count]), "sum", _world())
        count = sums[-1]
        mean = sums[:channels] / count
        centred = xf - mean.view(shape)
        var = collectives.all_reduce((centred * centred).sum(dims), "sum", _world()) / count
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is not None and running_mean is not None and running_var is not None:  # track_running_stats
            with torch.no_grad():
                tracked.add_(1)
                factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
                running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                running_var.lerp_(unbiased.to(running_var.dtype), factor)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: `nn.SyncBatchNorm` on CUDA (NCCL), `GlobalBatchNorm` elsewhere.

    Both keep BatchNorm's state keys, so checkpoints load into plain torch modules either way.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_batchnorm(module)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        for old_param, new_param in zip(module.parameters(), new.parameters()):
            new_param.requires_grad_(old_param.requires_grad)  # e.g. a frozen EMA teacher stays frozen
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child))
    return module
