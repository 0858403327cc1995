"""Throughput of the shared trainer's step against a bare PyTorch loop, measured in one run.

    python -m benchmarks.throughput [SPEC] [--set a.b=v ...] [--repeats 3]

Both loops train the same model (same initial weights) on the same augmented batches of the
spec's data with the same optimizer and the method's per-step update (an EMA teacher); the bare
loop has no scheduler, metrics, reporting or DDP wrapper. Reported: images/s of each (median over interleaved repeats), the median of the
per-repeat ratios (target >= 0.95 on CPU), and the share of the trainer's step time spent preparing data (augmentation
and normalisation of the views).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from ssl_tune.spec import load_spec
from trainers.loop import Reporter, Trainer
from trainers.optim import build_optimizers


def bare_epoch(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], trainer: Trainer, epoch: int) -> float:
    """One epoch of the simplest possible loop; returns images/s."""
    model.train()
    steps = 0
    start = time.perf_counter()
    for views in trainer.loader.epoch(epoch):
        loss = model(views).loss
        for optimizer in optimizers:  # the spec's, and the method's own (a learned kernel bandwidth)
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.after_optimizer_step(0.5)  # the method's own per-step work (EMA teachers); a no-op for TWIST
        steps += 1
    return steps * trainer.loader.local_batch_size / (time.perf_counter() - start)


def trainer_epoch(trainer: Trainer, epoch: int) -> float:
    trainer.epoch = epoch
    return trainer.train_epoch(Reporter())["images_per_s"]


def data_seconds(trainer: Trainer, epoch: int) -> float:
    start = time.perf_counter()
    sum(1 for _ in trainer.loader.epoch(epoch))  # prepare every batch of the epoch, train on none
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default="search_spaces/twist.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    spec = load_spec(args.spec, args.set).resolve()
    trainer = Trainer(spec)
    bare_model = copy.deepcopy(trainer.method)
    bare_opt = [opt for opt in build_optimizers(bare_model, spec) if opt is not None]

    trainer_epoch(trainer, 0)  # warm-up of both paths (allocator, thread pools)
    bare_epoch(bare_model, bare_opt, trainer, 0)
    shared, bare, data = [], [], []
    for r in range(1, args.repeats + 1):
        # Interleaved in alternating order (ABBA...), so drift in machine load and whichever
        # runs first after the other hit both paths alike.
        if r % 2:
            shared.append(trainer_epoch(trainer, r))
            bare.append(bare_epoch(bare_model, bare_opt, trainer, r))
        else:
            bare.append(bare_epoch(bare_model, bare_opt, trainer, r))
            shared.append(trainer_epoch(trainer, r))
        seconds = data_seconds(trainer, r)
        data.append(seconds / (trainer.loader.steps_per_epoch * trainer.loader.local_batch_size / shared[-1]))
    result = {
        "method": spec.method.name,
        "device": str(trainer.device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": spec.training.batch_size,
        "trainer_images_per_s": statistics.median(shared),
        "bare_images_per_s": statistics.median(bare),
        "ratio": statistics.median(s / b for s, b in zip(shared, bare)),
        "data_share": statistics.median(data),
    }
    print(f"{spec.method.name} step on {result['device']} ({result['threads']} threads), batch {result['batch_size']}, "
          f"median of {args.repeats} interleaved epochs each")
    print(f"  shared trainer   {result['trainer_images_per_s']:8.0f} images/s")
    print(f"  bare loop        {result['bare_images_per_s']:8.0f} images/s")
    print(f"  ratio            {result['ratio']:8.3f}   (median of per-pair ratios; target >= 0.95)")
    print(f"  data preparation {100 * result['data_share']:7.1f} % of the trainer's step time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
