"""Evaluation of a frozen backbone: weighted kNN, linear probe, label-fraction probes; collapse."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssl_tune import distributed
from ssl_tune.data.loader import Normalizer

# Next to a run's final checkpoint: the arrays of its final evaluation (the test embedding's first
# two principal components, the labels, the kNN confusion counts) that its figures are drawn from.
EVALUATION_FILE = "evaluation.npz"


@torch.no_grad()
def effective_rank(embeddings: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe effective rank of an N x D embedding matrix: exp of the entropy of its normalised
    singular values (Garrido et al., "RankMe", ICML 2023, https://arxiv.org/abs/2210.02885)::

        p_k = sigma_k / sum_j sigma_j + eps,   erank = exp(-sum_k p_k log p_k)

    It runs from 1 (every embedding on one line: collapse) to min(N, D) (all directions used equally).
    """
    sigma = torch.linalg.svdvals(embeddings.float())
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


# RankMe's paper estimates it on 25,600 representations; more rows change the estimate little and
# the SVD's cost grows with them (a million ResNet-50 features would take minutes on a CPU).
RANKME_SAMPLES = 25_600


@torch.no_grad()
def rankme(features: torch.Tensor, max_samples: int = RANKME_SAMPLES) -> float:
    """The label-free objective `search.metric: rankme`: `effective_rank` of at most `max_samples`
    representations, evenly spaced over the split (the same rows every epoch)."""
    step = max(1, math.ceil(len(features) / max_samples))
    return effective_rank(features[::step]).item()


@torch.no_grad()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, normalizer: Normalizer, *, batch_size: int = 512, device: torch.device
) -> torch.Tensor:
    """Pooled features of all `images` (uint8); the work is sharded over DDP ranks and gathered."""
    was_training = backbone.training
    backbone.eval()
    n, world, rank = len(images), distributed.world_size(), distributed.rank()
    shard = images[rank * n // world : (rank + 1) * n // world]
    feats = [backbone(normalizer.uint8(shard[i : i + batch_size].to(device))).float() for i in range(0, len(shard), batch_size)]
    local = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
    backbone.train(was_training)
    return distributed.gather_uneven(local)


@torch.no_grad()
def knn_ranking(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Classes ranked per test sample (N x C, best first) by a cosine kNN classifier with
    exp(sim / T)-weighted votes.

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", 2018.
    """
    train = F.normalize(train_features, dim=1)
    test = F.normalize(test_features, dim=1)
    train_labels = train_labels.to(train.device)
    k = min(k, len(train))
    ranked = []
    for start in range(0, len(test), chunk_size):
        sim, idx = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        ranked.append(votes.argsort(dim=1, descending=True))
    return torch.cat(ranked) if ranked else torch.zeros(0, num_classes, dtype=torch.long)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `knn_ranking`."""
    ranked = knn_ranking(train_features, train_labels, test_features, num_classes=num_classes, k=k, temperature=temperature)
    return ranking_accuracy(ranked, test_labels)


def ranking_accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of classes ranked per sample (N x C, best first)."""
    truth = labels.to(ranked.device).view(-1, 1)
    top1 = (ranked[:, :1] == truth).any(1).float().mean().item()
    top5 = (ranked[:, :5] == truth).any(1).float().mean().item()
    return 100.0 * top1, 100.0 * top5


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the samples of every class (at least one per class)."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        count = max(1, round(fraction * len(members)))
        picks.append(members[torch.randperm(len(members), generator=g)[:count]])
    return torch.cat(picks).sort().values


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (%) of a linear classifier trained on frozen, standardised features.

    SGD with momentum and a cosine schedule, as in the papers' linear evaluation, but on
    precomputed features (no augmentation), which makes it seconds on a CPU.
    """
    device = train_features.device
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xtr, xte = (train_features - mean) / std, (test_features - mean) / std
    ytr, yte = train_labels.to(device), test_labels.to(device)
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g).to(device)
        for i in range(0, len(xtr), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()


@torch.no_grad()
def principal_components(features: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The first `k` principal components of the L2-normalised features (N x k): the embedding's map."""
    x = F.normalize(features.float().cpu(), dim=1)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


def confusion_counts(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C counts: row = true class, column = predicted class."""
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts.index_put_((labels.cpu(), predicted.cpu()), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    return counts


def save_arrays(path: Path, arrays: dict[str, torch.Tensor]) -> None:
    """Save named tensors as a NumPy .npz, atomically (a crash never leaves half a file)."""
    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: v.cpu().numpy() for k, v in arrays.items()})
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict:
    """The arrays `save_arrays` wrote (NumPy, no pickles)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
