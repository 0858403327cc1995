"""Evaluation of a frozen backbone: weighted kNN, linear probe, label-fraction probes; collapse."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_tune import distributed
from ssl_tune.data.augment import centre_view
from ssl_tune.data.datasets import stratified_subset
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


def rankme_rows(n: int, max_samples: int = RANKME_SAMPLES) -> torch.Tensor:
    """The rows RankMe is estimated on: at most `max_samples` of `n`, evenly spaced (the same every epoch)."""
    return torch.arange(0, n, max(1, math.ceil(n / max_samples)))


@torch.no_grad()
def rankme(features: torch.Tensor, max_samples: int = RANKME_SAMPLES) -> float:
    """The label-free objective `search.metric: rankme`: `effective_rank` of at most `max_samples`
    representations (`rankme_rows`)."""
    return effective_rank(features[rankme_rows(len(features), max_samples)]).item()


def bank_rows(labels: torch.Tensor, size: int | None) -> torch.Tensor | None:
    """The labelled training images evaluation uses (`evaluation.bank_size`): a stratified subset of
    `size` rows, fixed (seed 0: the same for every trial, epoch and seed, so trials compare on the same
    bank), in increasing order; None for all of them."""
    if size is None or size >= len(labels):
        return None
    return stratified_subset(labels, size / len(labels), seed=0)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, normalizer: Normalizer, *, batch_size: int = 512, device: torch.device,
    rows: torch.Tensor | None = None, dtype: torch.dtype | None = None, to_all: bool = True,
    aspects: torch.Tensor | None = None, size: int | None = None,
) -> torch.Tensor | None:
    """Pooled features (float32) of `images` (uint8; `rows` of them if given), in order.

    Each DDP rank extracts its own shard, a batch at a time from wherever the images are (a memory-mapped
    cache: only the batch is read), under autocast to `dtype` (the training precision) if given. The
    shards are gathered on every rank (`to_all`) or on rank 0 only, the others getting None. Images
    that hold whole pictures resized to a square (`aspects`: each one's width / height) are seen as
    their centre square at `size` pixels (`centre_view`), as torchvision's Resize + CenterCrop would.
    """

    def view(batch: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        if aspects is None and (size is None or size == batch.shape[-1]):
            return normalizer.uint8(batch)
        aspect = aspects[picked].to(device) if aspects is not None else None
        return normalizer(centre_view(batch.float() / 255, aspect, size or batch.shape[-1]))

    was_training = backbone.training
    backbone.eval()
    n = len(images) if rows is None else len(rows)
    world, rank = distributed.world_size(), distributed.rank()
    lo, hi = rank * n // world, (rank + 1) * n // world
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    feats = []
    with autocast:
        for i in range(lo, hi, batch_size):
            j = min(i + batch_size, hi)
            picked = torch.arange(i, j) if rows is None else rows[i:j]
            batch = images[i:j] if rows is None else images[picked]
            feats.append(backbone(view(batch, picked)).float())
    backbone.train(was_training)
    local = torch.cat(feats) if feats else None
    if local is None:  # this rank's shard is empty: the feature width from one image
        with autocast:
            width = backbone(view(images[:1], torch.zeros(1, dtype=torch.long))).shape[1]
        local = torch.zeros(0, width, device=device)
    return distributed.gather_uneven(local) if to_all else distributed.gather_to_first(local)


# Test rows x bank rows compared at once by `knn_ranking`: 16 MB of float32 similarities.
KNN_CHUNK = (256, 16_384)


@torch.no_grad()
def knn_ranking(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int | None = None,
    bank_chunk: int | None = None,
) -> torch.Tensor:
    """Classes ranked per test sample (N x C, best first) by a cosine kNN classifier with
    exp(sim / T)-weighted votes.

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", 2018.

    Memory beyond the inputs is O(chunk_size x bank_chunk) (default `KNN_CHUNK`): each chunk of test
    rows is compared with the bank a chunk at a time, keeping a running top-k (at ImageNet scale a full
    row block would be a 1,024 x 1.28M matrix, 5.2 GB).
    """
    chunk_size, bank_chunk = chunk_size or KNN_CHUNK[0], bank_chunk or KNN_CHUNK[1]
    train = F.normalize(train_features, dim=1)
    test = F.normalize(test_features, dim=1)
    train_labels = train_labels.to(train.device)
    k = min(k, len(train))
    ranked = []
    for start in range(0, len(test), chunk_size):
        query = test[start : start + chunk_size]
        best: tuple[torch.Tensor, torch.Tensor] | None = None  # the running top-k: similarities and bank rows
        for b in range(0, len(train), bank_chunk):
            sim, idx = (query @ train[b : b + bank_chunk].T).topk(min(k, len(train) - b), dim=1)
            idx += b
            if best is not None:
                sim, idx = torch.cat([best[0], sim], 1), torch.cat([best[1], idx], 1)
                sim, pick = sim.topk(k, dim=1)
                idx = idx.gather(1, pick)
            best = sim, idx
        assert best is not None  # (a bank of at least one row)
        best_sim, best_idx = best
        votes = torch.zeros(len(query), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[best_idx], (best_sim / temperature).exp())
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


def save_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """Save named tensors (or NumPy arrays, lists of strings) as a NumPy .npz, atomically (a crash never
    leaves half a file)."""
    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        named: dict[str, Any] = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
        np.savez(f, **named)
    os.replace(tmp, path)


def load_arrays(path: Path) -> dict:
    """The arrays `save_arrays` wrote (NumPy, no pickles)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
