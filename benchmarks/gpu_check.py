"""The ImageNet-scale path on one GPU: ResNet-50 at 96 and 160 px in bf16, streamed against resident.

    python -m benchmarks gpu-check            # about 3 minutes on an H100/H200; under 8 by design

For each input size, a synthetic image-folder cache as `ssl-tune prepare` writes it (random pixels,
each picture stored at 1.15 x the input size with a random aspect ratio between 3:4 and 16:9),
memory-mapped from the local disk, and the shared trainer (TWIST, ResNet-50 with the ImageNet stem,
batch 256, bf16 autocast, channels-last) with the training images

* streamed: each step's rows gathered from the mapped cache into pinned host memory on a background
  thread and copied to the GPU without blocking (`data.on_device: false`);
* resident: the whole training split copied to the GPU once (`data.on_device: true`).

Measured per size and mode: training images/s over `--steps` steps after a warm-up, the peak device
memory of the rank (`torch.cuda.max_memory_allocated`: model, optimizer, activations, and the resident
images), and one evaluated epoch's evaluation (bank and test features in bf16, kNN and RankMe on this
rank): its seconds per image, and the evaluation's share of an epoch, measured at this size and
extrapolated to ImageNet-1k at the defaults (a bank of `evaluation.bank_size` images and the 50,000
validation images against 1,281,167 training images).

Then every method with the backbones researchers train (`--method-backbones`: ResNet-50 at 160 px and
ViT-S/16 at 224 px by default), streamed, over `--method-steps` steps (50) from the same initialisation
and the same batches, once in bf16 and once in fp32: bf16 images/s, peak device memory, and how far the
bf16 loss has drifted from the fp32 one after those steps (the mean of the last 10 steps' losses).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.backbones import VIT_OPTIMIZER

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 160], help="input sizes (px)")
    parser.add_argument("--images", type=int, default=25_600, help="training images of the synthetic cache")
    parser.add_argument("--test-images", type=int, default=5_000, help="test images of the synthetic cache")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--backbone", default="resnet50", help="backbone.name (small_cnn for a CPU smoke run)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (a smoke test)")
    parser.add_argument("--method-backbones", nargs="+", default=["resnet50@160", "timm:vit_small_patch16_224@224"],
                        help="NAME@SIZE: each method trains each of these backbones at that input size")
    parser.add_argument("--method-steps", type=int, default=50, help="steps of each method in bf16 and in fp32")


def synthetic_cache(directory: Path, images: int, test_images: int, size: int, seed: int = 0):
    """An `ImageDataset` shaped like an image-folder cache: memory-mapped uint8 squares of
    ceil(1.15 x size) px holding random pictures, with their aspect ratios, 100 classes."""
    import numpy as np
    import torch

    from ssl_tune.data.cache import CACHE_MARGIN
    from ssl_tune.data.datasets import ImageDataset

    stored = math.ceil(CACHE_MARGIN * size)
    rng = np.random.default_rng(seed)

    def split(name: str, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = directory / f"{name}_images.u8"
        array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(count, 3, stored, stored))
        for start in range(0, count, 1024):
            array[start:start + 1024] = rng.integers(0, 256, size=array[start:start + 1024].shape, dtype=np.uint8)
        array.flush()
        del array
        mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(count, 3, stored, stored)))
        aspects = torch.from_numpy(np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9), count)).astype(np.float32))
        return mapped, torch.from_numpy(rng.integers(0, 100, count)), aspects

    (xtr, ytr, atr), (xte, yte, ate) = split("train", images), split("test", test_images)
    return ImageDataset("synthetic", xtr, ytr, xte, yte, 100, channel_stats=([0.5] * 3, [0.29] * 3),
                        input_size=size, train_aspects=atr, test_aspects=ate)


def measure(dataset, size: int, resident: bool, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.data import train_steps
    from ssl_tune.spec.files import load_spec
    from trainers.loop import Reporter, Trainer

    cuda = torch.cuda.is_available()
    spec = load_spec(common.REPO / "search_spaces" / "twist.yaml", [
        f"backbone.name={args.backbone}", "backbone.cifar_stem=false", f"training.batch_size={args.batch_size}",
        f"training.precision={'bf16' if cuda else 'fp32'}", f"data.on_device={str(resident).lower()}",
        "evaluation.linear_probe=false"]).resolve()
    trainer = Trainer(spec, dataset=dataset)
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    train_steps(trainer, 3)  # warm-up: cuDNN's choice of kernels, the allocator, first touches of the cache
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    rate = train_steps(trainer, args.steps)
    synchronize()
    start = time.perf_counter()
    trainer.evaluate(Reporter(), last=False)
    synchronize()
    eval_s = time.perf_counter() - start
    bank = len(trainer.bank) if trainer.bank is not None else len(dataset.train_images)
    eval_per_image = eval_s / (bank + len(dataset.test_images))
    row = {"size": size, "mode": "resident" if resident else "streamed", "images_per_s": rate,
           "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "eval_s": eval_s, "eval_ms_per_image": 1000 * eval_per_image,
           "eval_share_here": eval_s / (len(dataset.train_images) / rate),
           "eval_share_imagenet": ((spec.evaluation.bank_size or IMAGENET_TRAIN) + IMAGENET_VAL) * eval_per_image
           / (IMAGENET_TRAIN / rate)}
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return row


def _peak(row: dict[str, Any]) -> str:
    return f"{row['peak_device_gib']:.1f} GiB peak" if row["peak_device_gib"] is not None else "CPU"


def method_steps(dataset, method: str, backbone: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """`--method-steps` steps of one method: images/s, peak device memory and the losses."""
    import torch

    from ssl_tune.spec.files import load_spec
    from trainers.loop import Trainer

    cuda = torch.cuda.is_available()
    size = dataset.image_size
    vit = []
    if backbone.startswith("timm:vit"):  # trained as ViTs are; at another size than its name's, given as img_size
        vit = [*VIT_OPTIMIZER, *([f"backbone.kwargs={{img_size: {size}}}"] if f"_{size}" not in backbone else [])]
    spec = load_spec(common.REPO / "search_spaces" / f"{method}.yaml", [
        f"backbone.name={backbone}", f"training.batch_size={args.batch_size}", f"training.precision={precision}",
        "data.on_device=false", "training.epochs=1", *vit]).resolve()
    trainer = Trainer(spec, dataset=dataset)
    trainer.model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches, losses = trainer.loader.epoch(0), []
    warmup = min(5, args.method_steps - 1)  # untimed: cuDNN's choice of kernels, the allocator
    try:
        for step in range(args.method_steps):
            if step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            losses.append(trainer.train_step(next(batches), step / trainer.total_steps).loss.detach().float())
        losses = [float(x) for x in losses]  # waits for the GPU
        elapsed = time.perf_counter() - start
    finally:
        batches.close()
    timed = args.method_steps - warmup
    row = {"method": method, "backbone": backbone, "precision": precision, "losses": losses,
           "images_per_s": timed * args.batch_size / elapsed,
           "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return row


def methods_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method with each of `--method-backbones`, in bf16 and fp32 from the same start."""
    import torch

    from trainers import methods

    rows = []
    for entry in args.method_backbones:
        backbone, _, size = entry.rpartition("@")
        with tempfile.TemporaryDirectory(prefix="ssl-tune-gpu-check-") as tmp:
            dataset = synthetic_cache(Path(tmp), args.method_steps * args.batch_size, args.batch_size, int(size))
            for method in methods():
                bf16 = method_steps(dataset, method, backbone, "bf16", args)
                fp32 = method_steps(dataset, method, backbone, "fp32", args)
                tail = max(1, min(10, len(bf16["losses"])))
                last_bf16, last_fp32 = (sum(r["losses"][-tail:]) / tail for r in (bf16, fp32))
                row = {"method": method, "backbone": backbone, "size": int(size), "images_per_s": bf16["images_per_s"],
                       "fp32_images_per_s": fp32["images_per_s"], "peak_device_gib": bf16["peak_device_gib"],
                       "loss_bf16": last_bf16, "loss_fp32": last_fp32,
                       "drift": abs(last_bf16 - last_fp32) / max(abs(last_fp32), 1e-12)}
                rows.append(row)
                print(f"{method}, {backbone} at {size} px: {row['images_per_s']:,.0f} images/s in bf16 "
                      f"({row['fp32_images_per_s']:,.0f} in fp32), {_peak(row)}; loss after {args.method_steps} steps "
                      f"{last_bf16:.4f} bf16, {last_fp32:.4f} fp32 ({100 * row['drift']:.2f} % apart)", flush=True)
            del dataset
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("gpu-check needs a CUDA GPU; run it on one, e.g. through the device tool")
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="ssl-tune-gpu-check-") as tmp:
            dataset = synthetic_cache(Path(tmp), args.images, args.test_images, size)
            for resident in (False, True):
                row = measure(dataset, size, resident, args)
                rows.append(row)
                print(f"{size} px, {row['mode']}: {row['images_per_s']:,.0f} images/s, {_peak(row)}, evaluation "
                      f"{row['eval_ms_per_image']:.3f} ms/image ({100 * row['eval_share_here']:.1f} % of an epoch "
                      f"here, {100 * row['eval_share_imagenet']:.1f} % on ImageNet-1k)", flush=True)
            del dataset
    for size in args.sizes:
        streamed_row, resident_row = (next(r for r in rows if r["size"] == size and r["mode"] == m)
                                      for m in ("streamed", "resident"))
        streamed_row["streamed_over_resident"] = streamed_row["images_per_s"] / resident_row["images_per_s"]
    method_rows = methods_rows(args)
    return {"device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "backbone": args.backbone, "batch_size": args.batch_size, "images": args.images,
            "test_images": args.test_images, "rows": rows, "method_steps": args.method_steps,
            "method_rows": method_rows, "seconds": time.perf_counter() - started}


def report(result: dict[str, Any], figures: str) -> str:
    lines = [f"{result['device_name']}, TWIST with {result['backbone']} (ImageNet stem), batch {result['batch_size']}, "
             f"bf16; a synthetic cache of {result['images']:,} + {result['test_images']:,} images; "
             f"{result['seconds']:.0f} s in all.", "",
             "| input | training images | images/s | streamed / resident | peak device memory | evaluation ms/image | "
             "evaluation / epoch, here | evaluation / epoch, ImageNet-1k |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = f"{r['streamed_over_resident']:.3f}" if "streamed_over_resident" in r else ""
        memory = f"{r['peak_device_gib']:.1f} GiB" if r["peak_device_gib"] is not None else "-"
        lines.append(f"| {r['size']} px | {r['mode']} | {r['images_per_s']:,.0f} | {ratio} | {memory} | "
                     f"{r['eval_ms_per_image']:.3f} | {r['eval_share_here']:.3f} | {r['eval_share_imagenet']:.3f} |")
    lines += ["", f"Each method, streamed, batch {result['batch_size']}, {result['method_steps']} steps from the same "
              "start in bf16 and in fp32 (loss: the mean of the last 10 steps):", "",
              "| method | backbone | input | bf16 images/s | fp32 images/s | peak device memory (bf16) | loss bf16 | "
              "loss fp32 | drift |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.get("method_rows", []):
        memory = f"{r['peak_device_gib']:.1f} GiB" if r["peak_device_gib"] is not None else "-"
        lines.append(f"| {r['method']} | {r['backbone']} | {r['size']} px | {r['images_per_s']:,.0f} | "
                     f"{r['fp32_images_per_s']:,.0f} | {memory} | {r['loss_bf16']:.4f} | {r['loss_fp32']:.4f} | "
                     f"{100 * r['drift']:.2f} % |")
    return "\n".join(lines)
