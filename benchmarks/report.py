"""docs/benchmarks.md from the JSON results the benchmarks saved: one section per benchmark."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks import (backbones, cluster, data, gpu_check, knn_bank, label_free, loss_scaling, noise, proxy_search,
                        racing, search_efficiency, search_overhead, throughput)

# (result file, title, what it measures, renderer, command to run when there is no result yet)
SECTIONS = [
    ("throughput", "Step throughput against a bare PyTorch loop (CPU)",
     "Images/s of the shared trainer over images/s of a bare loop training the same model on the same batches "
     "(1.000 = no overhead), and the share of the trainer's step time spent preparing the views.",
     throughput.report),
    ("gpu-throughput", "Step throughput on a GPU: ResNet-18, CIFAR-sized inputs, bf16",
     "The same comparison on a GPU, with absolute images/s and the fraction of the GPU's peak dense bf16 FLOP/s.",
     throughput.report_gpu),
    ("gpu-check", "The ImageNet-scale path on one GPU: ResNet-50, streamed against resident",
     "ResNet-50 (TWIST, bf16, batch 256) at 96 and 160 px on a synthetic image-folder cache: training images/s "
     "with the images streamed from the node's mapped cache through pinned memory and with them resident on the "
     "GPU, peak device memory of the rank, and the evaluation's share of an epoch.",
     gpu_check.report),
    ("search-overhead", "Search overhead",
     "Wall time of an N-trial `ssl-tune run` (one trial at a time, no early stopping) over the wall time of "
     "the same configurations trained by bare `Trainer` calls, and the fixed cost per trial.",
     search_overhead.report),
    ("efficiency-table", "Search efficiency: the measured grid",
     "Every point of a grid over TWIST's lr and tau trained with the real trainer on the bundled data; "
     "the efficiency benchmark replays searches on these curves.",
     search_efficiency.report_table),
    ("efficiency", "Search efficiency: TPE + ASHA against random search, TPE alone and Optuna's other samplers",
     "Best objective reached as a function of the compute spent (epochs trained), at the same budget.",
     search_efficiency.report),
    ("proxy", "Searching at a proxy, confirming at the full setting",
     "The shipped TWIST pipeline (search and confirmation at the full setting) against a search at a cheap proxy "
     "whose confirmation runs at the full setting (`search.confirm.overrides`): the winners' confirmed means, "
     "paired by seed, and the compute of each.",
     proxy_search.report_proxy),
    ("warm-start", "Warm start from an earlier search",
     "A search of the shipped TWIST spec, then the same spec with `search.warm_start` naming it and another "
     "sampler seed: the epochs each trains before its best reaches the first search's best within the noise floor.",
     proxy_search.report_warm_start),
    ("racing", "The racing confirmation against fixed seeds (simulated)",
     "Confirmations simulated on the measured seed noise: the runs each design trains, its false \"beats the "
     "default\" rate when nothing beats the default, and how often it finds a gain of 1 and 2 noise SDs.",
     racing.report),
    ("noise", "Seed noise, and RankMe against kNN top-1",
     "Configurations of the efficiency grid trained again on fresh seeds: how much one configuration's result "
     "varies from seed to seed (the noise floor every comparison of single runs sits on), and how well the "
     "label-free RankMe ranks configurations the way kNN top-1 does.",
     noise.report),
    ("label-free", "RankMe against kNN top-1 over each method's search",
     "Each method's shipped search (without its confirmation stage) on the bundled data: how well the "
     "label-free RankMe ranks the search's trials the way kNN top-1 does.",
     label_free.report),
    ("knn-bank", "The kNN bank: a stratified subset against the whole training split",
     "The shipped TWIST search on the bundled data: kNN top-1 of every trial's last checkpoint with banks of "
     "a few images per class (what `evaluation.bank_size` selects) against the whole training split, and how "
     "well each ranks the trials the same way.",
     knn_bank.report),
    ("backbones", "A ViT-tiny against the shipped small CNN, per method",
     "kNN top-1 on the bundled data after the same epochs of each method, with the shipped `small_cnn` and with "
     "timm's ViT-tiny at 28 px (patch 4) trained with AdamW, warm-up and cosine decay.",
     backbones.report),
    ("loss-scaling", "Scaling of the losses",
     "Forward + backward of each loss alone, relative to the smallest size measured in the same run.",
     loss_scaling.report),
    ("data", "Data: the decoded, memory-mapped cache against decoding an ImageFolder",
     "A synthetic ImageFolder of JPEGs read by `ssl-tune prepare` into the cache, against torchvision's "
     "DataLoader, the in-memory loader ssl-tune had before, and private in-memory copies.",
     data.report),
    ("cluster", "A 2-worker trial on two hosts against one host",
     "Epoch time of one DDP trial whose two workers sit on two hosts (network namespaces joined by a veth "
     "pair: gradients and global-batch gathers cross the link) over the same trial with both workers on one "
     "host.",
     cluster.report),
]


def _machine(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else ", no GPU"
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "ray", "optuna", "mlflow") if k in m)
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; Python {m['python']}, {versions}"


def render(results: Path, report: Path) -> str:
    out = ["# Benchmarks", "",
           "Generated by `python -m benchmarks NAME` (see `benchmarks/__main__.py`), which saves "
           "`docs/benchmarks/NAME.json` and rewrites this page from every saved result. Each section names the "
           "command, the date, the commit and the machine of its run. On a CPU every figure is a ratio against "
           "a baseline measured in the same run; absolute numbers are given only for GPU runs. Run them with "
           "`bash scripts/in-venv.sh python -m benchmarks NAME`.", ""]
    for name, title, what, render_section in SECTIONS:
        path = results / f"{name}.json"
        out += [f"## {title}", "", what, ""]
        if path.exists():
            result = json.loads(path.read_text())
            figures = os.path.relpath(results, report.parent)
            out += [f"`{result['command']}` on {result['date']}, commit {result['machine']['commit']}: "
                    f"{_machine(result['machine'])}.", "", render_section(result, figures), ""]
        else:
            out += [f"Not measured yet. Command: `python -m benchmarks {name}`"
                    + (" on a machine with a CUDA GPU." if name.startswith("gpu-") else "."), ""]
        notes = results / "notes" / f"{name}.md"  # hand-written reading of the result
        if notes.exists():
            out += [notes.read_text().strip(), ""]
    return "\n".join(out)
