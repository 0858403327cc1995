"""Global batch norm under DDP: 2 ranks normalise with the statistics of the whole batch."""

import pytest
import torch
from torch import nn

from ssl_tune.distributed import GlobalBatchNorm, convert_batchnorm
from tests.ranks import run_on_ranks


def _batch():
    # A large mean next to a small spread: E[x^2] - E[x]^2 in float32 loses the variance here.
    g = torch.Generator().manual_seed(0)
    return 3000.0 + 0.05 * torch.randn(16, 3, 4, 4, generator=g)


def _normalise_half(rank):
    bn = convert_batchnorm(nn.BatchNorm2d(3), torch.device("cpu"))
    x = _batch()[rank * 8 : (rank + 1) * 8].requires_grad_()
    y = bn(x)
    (y * torch.arange(3.0).view(1, 3, 1, 1)).pow(2).sum().backward()
    return y.detach(), x.grad, bn.running_var.clone()


def test_two_ranks_normalise_with_the_whole_batch_statistics_even_with_a_large_mean():
    x = _batch().double()
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + 1e-5)).float()
    reference = nn.BatchNorm2d(3).double()
    whole = _batch().double().requires_grad_()
    (reference(whole) * torch.arange(3.0).view(1, 3, 1, 1)).pow(2).sum().backward()
    results = run_on_ranks(_normalise_half, 2)
    y = torch.cat([r[0] for r in results])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-2)  # float32 sums of values near 3000: ~1e-4 in x
    torch.testing.assert_close(torch.cat([r[1] for r in results]), whole.grad.float(), rtol=0, atol=2e-3)
    for _, _, running_var in results:
        torch.testing.assert_close(running_var, reference.running_var.float(), rtol=1e-2, atol=1e-6)


def test_conversion_keeps_batchnorm_state_and_frozen_parameters():
    frozen = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    frozen.requires_grad_(False)
    frozen[1].running_mean.fill_(0.5)
    converted = convert_batchnorm(frozen, torch.device("cpu"))
    assert isinstance(converted[1], GlobalBatchNorm)
    assert converted[1].running_mean.eq(0.5).all()
    assert not any(p.requires_grad for p in converted.parameters())


def _rank_one_dies(rank):
    import os

    import torch.distributed as dist

    if rank == 1:
        os._exit(3)  # as a rank killed by the OOM killer: no result, no traceback
    dist.all_reduce(torch.ones(1))  # rank 0 waits for it in a collective
    return rank


def _rank_one_blocks(rank):
    import threading

    if rank == 1:
        threading.Event().wait()  # never answers
    return rank


def test_a_rank_that_dies_or_blocks_fails_the_caller_instead_of_hanging_it():
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] exited \(codes \[3\]\) without a result"):
        run_on_ranks(_rank_one_dies, 2, timeout=60)
    with pytest.raises(RuntimeError, match="no answer from every rank within 5 s; answered: \\[0\\]"):
        run_on_ranks(_rank_one_blocks, 2, timeout=5)
