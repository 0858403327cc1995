"""kNN top-1 of a ViT-tiny against the shipped `small_cnn`, per method, on the bundled data.

    python -m benchmarks backbones [--methods twist isd] [--epochs 8]

Each method trains from its search space's defaults (`search_spaces/NAME.yaml`, its centre values) for
`--epochs` epochs, once with the shipped `small_cnn` and once with timm's ViT-tiny at the bundled data's
28 px (patch 4: 49 tokens), trained as ViTs are: AdamW (lr 1e-3 at batch 256, weight decay 0.05, none on
position embeddings, tokens, norms and biases), one epoch of warm-up, cosine decay. No goal: a reference for
what a ViT gives at this scale (10,000 images), where convolutions' inductive bias is known to win.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import common

# How ViTs are trained (DeiT, DINO): AdamW, weight decay 0.05, warm-up, cosine decay.
VIT_OPTIMIZER = ["optimizer.name=adamw", "optimizer.lr=0.001", "optimizer.weight_decay=0.05", "optimizer.momentum=0.9",
                 "optimizer.warmup_epochs=1"]
VIT_TINY = ["backbone.name=timm:vit_tiny_patch16_224", "backbone.kwargs={img_size: 28, patch_size: 4}", *VIT_OPTIMIZER]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainers import builtin_methods

    parser.add_argument("--methods", nargs="+", default=list(builtin_methods()))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], help="override a field of every run (smoke tests)")
    parser.add_argument("--images", type=int, default=None, help="train on the first N training images only (smoke tests)")


def train(method: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.throughput import first_images
    from ssl_tune.spec.files import load_spec
    from trainers.loop import Trainer

    spec = load_spec(common.REPO / "search_spaces" / f"{method}.yaml",
                     [f"training.epochs={args.epochs}", *overrides, *args.set]).resolve()
    start = time.perf_counter()
    trainer = Trainer(spec, dataset=first_images(spec, args.images))
    result = trainer.fit()
    m = result.metrics
    return {"status": result.status, "seconds": time.perf_counter() - start, "knn_top1": m.get("knn_top1"),
            "linear_top1": m.get("linear_top1"), "knn_top1_random_init": m.get("knn_top1_random_init"),
            "parameters": sum(p.numel() for p in trainer.method.backbone.parameters())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for method in args.methods:
        for backbone, overrides in (("small_cnn", []), ("vit_tiny", VIT_TINY)):
            row = {"method": method, "backbone": backbone, **train(method, overrides, args)}
            rows.append(row)
            print(f"{method:11s} {backbone:9s} kNN top-1 {row['knn_top1']} (random init {row['knn_top1_random_init']}), "
                  f"{row['seconds']:.0f} s, {row['status']}", flush=True)
    return {"epochs": args.epochs, "overrides": args.set, "images": args.images, "rows": rows}


def report(result: dict[str, Any], figures: str) -> str:
    def number(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else "-"

    images = f"the first {result['images']:,} training images" if result.get("images") else "every training image"
    lines = [f"{result['epochs']} epochs per run on {images}; each method's search-space defaults.", "",
             "| method | backbone | parameters | kNN top-1 | at initialisation | linear probe | wall time |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['parameters'] / 1e6:.2f}M | {number(r['knn_top1'])} | "
                     f"{number(r['knn_top1_random_init'])} | {number(r['linear_top1'])} | {r['seconds']:.0f} s |")
    return "\n".join(lines)
