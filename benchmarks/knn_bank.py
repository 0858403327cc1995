"""A subset kNN bank ranks a search's trials as the whole training split does.

    python -m benchmarks knn-bank [--spec search_spaces/twist.yaml] [--banks 250 500 1000 2500]

Runs the spec's search on the bundled data (its confirmation stage off), then loads every trial's
last checkpoint and computes kNN top-1 on the test split with the whole training split as the bank,
and with a stratified, fixed bank of each size (`ssl_tune.evaluation.bank_rows`: what
`evaluation.bank_size` selects). Reports Spearman's rank correlation between each bank's kNN top-1
and the whole split's over the trials, and the largest difference. 250 images is 25 per class, what the
default 25,600-image bank holds per class of ImageNet-1k's 1,000.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.noise import spearman


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", type=Path, default=common.REPO / "search_spaces" / "twist.yaml")
    parser.add_argument("--banks", type=int, nargs="+", default=[250, 500, 1000, 2500], help="bank sizes to compare")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="spec overrides for the search")


def trial_accuracies(client, parent, banks: list[int]) -> list[dict[str, Any]]:
    """kNN top-1 of each trial's last checkpoint against the whole training split and each bank."""
    import torch

    from ssl_tune import tracking
    from ssl_tune.trials import checkpoints
    from ssl_tune.evaluation import bank_rows, knn_accuracy
    from trainers import spec_model
    from trainers.loop import Trainer

    rows = []
    for run in tracking.child_runs(client, parent):
        if run.info.status == "FAILED" or tracking.TAG_CHECKPOINT not in run.data.tags:
            continue
        with tracking.checkpoint_of(client, run) as directory:
            state = checkpoints.load(directory / checkpoints.CHECKPOINT_FILE)
        trainer = Trainer(spec_model().model_validate(state["spec"]), device=torch.device("cpu"))
        trainer.method.load_state_dict(state["model"])
        d = trainer.dataset
        train, test = trainer._features("train", None), trainer._features("test", None)
        if train is None or test is None:  # (one process: rank 0 holds the features)
            raise SystemExit("knn-bank: no features extracted")
        row = {"run_id": run.info.run_id, "epoch": state["epoch"], "classes": d.num_classes,
               "logged_knn_top1": run.data.metrics.get("knn_top1")}
        for size in [len(train), *banks]:
            picked = bank_rows(d.train_labels, size)
            picked = torch.arange(len(train)) if picked is None else picked
            row[str(size)], _ = knn_accuracy(train[picked], d.train_labels[picked], test, d.test_labels,
                                             num_classes=d.num_classes, k=trainer.spec.evaluation.knn_k,
                                             temperature=trainer.spec.evaluation.knn_temperature)
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ssl_tune import tracking

    with tempfile.TemporaryDirectory(prefix="ssl-tune-knn-bank-") as work:
        start = time.perf_counter()
        overrides = [x for o in ["search.confirm.top_k=0", "evaluation.bank_size=null", *args.set] for x in ("--set", o)]
        proc = subprocess.run([str(Path(sys.executable).parent / "ssl-tune"), "run", str(args.spec), "--name", "bank",
                               *overrides], cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"knn-bank: the search failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
        rows = trial_accuracies(client, tracking.find_parent_run(client, "bank"), args.banks)
    full = str(max(int(k) for k in rows[0] if k.isdigit()))
    per_bank = {}
    for size in args.banks:
        per_bank[str(size)] = {
            "spearman": spearman([r[str(size)] for r in rows], [r[full] for r in rows]),
            "max_abs_difference": max(abs(r[str(size)] - r[full]) for r in rows),
            "best_is_the_same": max(rows, key=lambda r: r[str(size)])["run_id"] == max(rows, key=lambda r: r[full])["run_id"]}
        print(f"bank {size}: Spearman {per_bank[str(size)]['spearman']:.3f} with the whole split ({full}) over "
              f"{len(rows)} trials", flush=True)
    return {"spec": common.repo_relative(args.spec), "trials": len(rows), "full_bank": int(full), "search_s": seconds,
            "classes": rows[0]["classes"], "banks": per_bank, "rows": rows}


def report(result: dict[str, Any], figures: str) -> str:
    lines = [f"{result['trials']} trials of `{result['spec']}` (the search took {result['search_s']:.0f} s); the whole "
             f"training split is {result['full_bank']:,} images.", "",
             "| bank | per class | Spearman with the whole split | largest difference in kNN top-1 | same best trial |",
             "|---:|---:|---:|---:|---|"]
    for size, b in result["banks"].items():
        lines.append(f"| {int(size):,} | {int(size) // result['classes']} | {b['spearman']:.3f} | "
                     f"{b['max_abs_difference']:.2f} | {'yes' if b['best_is_the_same'] else 'no'} |")
    return "\n".join(lines)
