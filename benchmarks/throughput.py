"""Step throughput of the shared trainer against a bare PyTorch loop, measured in one run.

    python -m benchmarks throughput [--specs search_spaces/*.yaml] [--repeats 4]
    python -m benchmarks gpu-throughput [--batch-sizes 256 512] [--method twist]   # needs CUDA

Both loops train the same model (same initial weights) on the same augmented batches with the
same optimizer, precision and the method's per-step update (an EMA teacher); the bare loop has no
scheduler, metrics, reporting or DDP wrapper. Epochs of the two alternate (ABBA...), so drift in
machine load hits both alike. Reported: images/s of each (median over repeats), the median of the
per-repeat ratios, and the share of the trainer's step time spent preparing data (augmenting and
normalising the views; on a GPU that happens on the GPU).

`gpu-throughput` trains a ResNet-18 (CIFAR stem) on CIFAR-sized inputs (3 x 32 x 32, random pixels:
no CIFAR ships here, and throughput does not depend on the pixels) with bf16 autocast and
channels-last, and adds the fraction of the GPU's peak dense bf16 FLOP/s the trainer achieves
(FLOPs of one step counted by `torch.utils.flop_counter`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from ssl_tune.spec.files import load_spec
from trainers.base import Method
from trainers.loop import Reporter, Trainer
from trainers.optim import build_optimizers


def method_specs() -> list[str]:
    """The search-space YAML of every built-in method (search_spaces/NAME.yaml), from the registry."""
    from trainers import builtin_methods

    return [str(common.REPO / "search_spaces" / f"{name}.yaml") for name in builtin_methods()]

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_step(model: Method, optimizers: list[torch.optim.Optimizer], trainer: Trainer, views) -> None:
    if trainer.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    autocast = (torch.autocast(trainer.device.type, dtype=trainer.autocast_dtype) if trainer.autocast_dtype
                else contextlib.nullcontext())
    with autocast:
        loss = model(views).loss
    for optimizer in optimizers:  # the spec's, and the method's own (a learned kernel bandwidth)
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    model.after_optimizer_step(0.5)  # the method's own per-step work (EMA teachers); a no-op for TWIST


def bare_epoch(model: Method, optimizers: list[torch.optim.Optimizer], trainer: Trainer, epoch: int) -> float:
    """One epoch of the simplest possible loop; returns images/s."""
    model.train()
    steps = 0
    start = time.perf_counter()
    for views in trainer.loader.epoch(epoch):
        _bare_step(model, optimizers, trainer, views)
        steps += 1
    _sync(trainer.device)
    return steps * trainer.loader.local_batch_size / (time.perf_counter() - start)


def trainer_epoch(trainer: Trainer, epoch: int) -> float:
    trainer.epoch = epoch
    return trainer.train_epoch(Reporter())["images_per_s"]  # ends with .item(): synchronised


def data_seconds(trainer: Trainer, epoch: int) -> float:
    start = time.perf_counter()
    sum(1 for _ in trainer.loader.epoch(epoch))  # prepare every batch of the epoch, train on none
    _sync(trainer.device)
    return time.perf_counter() - start


def step_flops(trainer: Trainer) -> float:
    """FLOPs of one training step (forward and backward) of the trainer's model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(trainer.method)
    views = next(iter(trainer.loader.epoch(0)))
    with FlopCounterMode(display=False) as counter:
        _bare_step(model, [], trainer, views)
    return float(counter.get_total_flops())


def compare(trainer: Trainer, repeats: int) -> dict[str, Any]:
    """Interleaved epochs of the trainer and of a bare loop over the same batches."""
    bare_model = copy.deepcopy(trainer.method)
    bare_optimizers = [opt for opt in build_optimizers(bare_model, trainer.spec) if opt is not None]
    trainer_epoch(trainer, 0)  # warm-up of both paths (allocator, kernels, thread pools)
    bare_epoch(bare_model, bare_optimizers, trainer, 0)
    shared, bare, data = [], [], []
    for r in range(1, repeats + 1):
        if r % 2:
            shared.append(trainer_epoch(trainer, r))
            bare.append(bare_epoch(bare_model, bare_optimizers, trainer, r))
        else:
            bare.append(bare_epoch(bare_model, bare_optimizers, trainer, r))
            shared.append(trainer_epoch(trainer, r))
        epoch_s = trainer.loader.steps_per_epoch * trainer.loader.local_batch_size / shared[-1]
        data.append(data_seconds(trainer, r) / epoch_s)
    return {
        "trainer_images_per_s": statistics.median(shared),
        "bare_images_per_s": statistics.median(bare),
        "ratio": statistics.median(s / b for s, b in zip(shared, bare)),
        "data_share": statistics.median(data),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--specs", nargs="+", default=method_specs())
    parser.add_argument("--set", action="append", default=[], help="override a field of every spec")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONE_ROWS),
                        help="after every spec's own backbone: TWIST with each of these (their settings: BACKBONE_ROWS)")
    parser.add_argument("--backbone-images", type=int, default=1280, help="training images of the --backbones rows")


# Larger backbones, trained by TWIST on the bundled data's first `--backbone-images` (a CPU epoch of the
# whole set takes a ViT-tiny minutes): the overrides of each.
BACKBONE_ROWS = {
    "resnet18": ["backbone.name=resnet18", "training.batch_size=128"],
    "timm:vit_tiny_patch16_224": ["backbone.name=timm:vit_tiny_patch16_224", "backbone.kwargs={img_size: 28, patch_size: 4}",
                                  "training.batch_size=128", "optimizer.name=adamw", "optimizer.lr=0.001",
                                  "optimizer.weight_decay=0.05"],
}


def first_images(spec, images: int | None):
    """The spec's data set, its training split cut to the first `images` (all of it with None)."""
    import dataclasses

    from ssl_tune.data.cache import open_dataset

    dataset = open_dataset(spec.data)[0]
    if images is None:
        return dataset
    return dataclasses.replace(dataset, train_images=dataset.train_images[:images],
                               train_labels=dataset.train_labels[:images],
                               train_aspects=None if dataset.train_aspects is None else dataset.train_aspects[:images])


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    runs = [(path, args.set, None) for path in args.specs]
    runs += [(str(common.REPO / "search_spaces" / "twist.yaml"), [*args.set, *BACKBONE_ROWS[name]], args.backbone_images)
             for name in args.backbones]
    for path, overrides, images in runs:
        spec = load_spec(path, overrides).resolve()
        trainer = Trainer(spec, dataset=first_images(spec, images))
        row = {"method": spec.method.name, "spec": Path(path).name, "batch_size": spec.training.batch_size,
               "backbone": spec.backbone.name, "images": len(trainer.dataset.ssl_images),
               "device": str(trainer.device), "threads": torch.get_num_threads(), **compare(trainer, args.repeats)}
        rows.append(row)
        print(f"{row['method']:11s} {row['backbone']:26s} trainer {row['trainer_images_per_s']:7.0f} images/s, bare loop "
              f"{row['bare_images_per_s']:7.0f}, ratio {row['ratio']:.3f}, data {100 * row['data_share']:.1f} %",
              flush=True)
    return {"repeats": args.repeats, "overrides": args.set, "rows": rows}


def report(result: dict[str, Any], figures: str) -> str:
    lines = ["| method | backbone | batch | trainer / bare loop (images/s) | data preparation share of step time |",
             "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r.get('backbone', 'small_cnn')} | {r['batch_size']} | {r['ratio']:.3f} | "
                     f"{100 * r['data_share']:.1f} % |")
    return "\n".join(lines)


# --- GPU: ResNet-18 on CIFAR-sized inputs ------------------------------------------------------


def synthetic_cifar(images: int, seed: int = 0):
    from ssl_tune.data.datasets import ImageDataset

    g = torch.Generator().manual_seed(seed)
    pixels = lambda n: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)  # noqa: E731
    return ImageDataset("synthetic_cifar", pixels(images), torch.randint(0, 10, (images,), generator=g),
                        pixels(1000), torch.randint(0, 10, (1000,), generator=g), 10)


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default=str(common.REPO / "search_spaces" / "twist.yaml"),
                        help="the method and its settings; the backbone becomes ResNet-18")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images", type=int, default=50_000, help="images per epoch (CIFAR-10's 50,000)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to check the harness only)")


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu-throughput needs a CUDA GPU; run it on one, e.g. through the device tool")
    dataset = synthetic_cifar(args.images)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name)
    rows = []
    for batch in args.batch_sizes:
        spec = load_spec(args.spec, ["backbone.name=resnet18", "backbone.cifar_stem=true",
                                     "data.augmentation.crop_min_scale=0.2", f"training.batch_size={batch}",
                                     "training.precision=auto"]).resolve()
        trainer = Trainer(spec, dataset=dataset)
        row = {"batch_size": batch, "precision": "bf16" if trainer.autocast_dtype is torch.bfloat16 else "fp32",
               **compare(trainer, args.repeats)}
        row["step_flops"] = step_flops(trainer)
        achieved = row["step_flops"] * row["trainer_images_per_s"] / batch
        row["achieved_flops_per_s"] = achieved
        row["fraction_of_peak"] = achieved / peak if peak else None
        rows.append(row)
        fraction = f"{100 * row['fraction_of_peak']:.1f} % of peak" if peak else "peak unknown"
        print(f"batch {batch}: trainer {row['trainer_images_per_s']:.0f} images/s, bare loop "
              f"{row['bare_images_per_s']:.0f}, ratio {row['ratio']:.3f}, data {100 * row['data_share']:.1f} %, "
              f"{achieved / 1e12:.1f} TFLOP/s ({fraction})", flush=True)
    return {"device_name": name, "peak_bf16_flops_per_s": peak, "method": load_spec(args.spec).method.name,
            "images_per_epoch": args.images, "rows": rows}


def report_gpu(result: dict[str, Any], figures: str) -> str:
    lines = [f"{result['device_name']}, method {result['method']}, ResNet-18 (CIFAR stem), 3 x 32 x 32 inputs, "
             f"{result['images_per_epoch']} images per epoch.", "",
             "| batch | precision | trainer images/s | bare loop images/s | ratio | data share | TFLOP/s | of peak |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        fraction = f"{100 * r['fraction_of_peak']:.1f} %" if r["fraction_of_peak"] else "-"
        lines.append(f"| {r['batch_size']} | {r['precision']} | {r['trainer_images_per_s']:.0f} | "
                     f"{r['bare_images_per_s']:.0f} | {r['ratio']:.3f} | {100 * r['data_share']:.1f} % | "
                     f"{r['achieved_flops_per_s'] / 1e12:.1f} | {fraction} |")
    return "\n".join(lines)
