"""RankMe against kNN top-1 over the trials of a real search, for every method.

    python -m benchmarks label-free [--methods twist isd ...]     # ~5 min per method on 2 cores

Runs each method's shipped search (`search_spaces/NAME.yaml`, its confirmation stage off: only the
search's trials are compared) with `ssl-tune run`, then reads every trial that did not fail from its
MLflow store and reports Spearman's rank correlation between RankMe and kNN top-1 at each trial's
last evaluated epoch (what the search ranks), and over every evaluated epoch of every trial. A
correlation near 1 means a search on RankMe, which needs no labels, would rank trials as one on kNN
top-1 does.
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


def method_search(method: str, overrides: list[str]) -> dict[str, Any]:
    from ssl_tune import tracking

    spec = common.REPO / "search_spaces" / f"{method}.yaml"
    with tempfile.TemporaryDirectory(prefix=f"ssl-tune-label-free-{method}-") as work:
        start = time.perf_counter()
        settings = [x for o in ["search.confirm.top_k=0", *overrides] for x in ("--set", o)]
        proc = subprocess.run([str(Path(sys.executable).parent / "ssl-tune"), "run", str(spec), "--name", method,
                               *settings], cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"label-free: the {method} search failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
        parent = tracking.find_parent_run(client, method)
        last, every = [], []
        for run in tracking.child_runs(client, parent):
            if run.info.status == "FAILED" or "rankme" not in run.data.metrics:
                continue
            last.append((run.data.metrics["rankme"], run.data.metrics["knn_top1"]))
            history = {name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
                       for name in ("rankme", "knn_top1")}
            every += [(v, history["knn_top1"][step]) for step, v in history["rankme"].items() if step in history["knn_top1"]]
    return {"trials": len(last), "epochs": len(every), "seconds": seconds,
            "spearman_last_epoch": spearman([r for r, _ in last], [k for _, k in last]),
            "spearman_every_epoch": spearman([r for r, _ in every], [k for _, k in every]),
            "best_by_knn_is_best_by_rankme": max(last, key=lambda t: t[1]) == max(last, key=lambda t: t[0])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="spec overrides for each search")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trainers import builtin_methods

    results = {}
    for method in args.methods or list(builtin_methods()):
        results[method] = method_search(method, args.set)
        print(f"  {method}: {results[method]}", flush=True)
    return {"methods": results}


def report(result: dict[str, Any], figures: str) -> str:
    lines = ["| method | trials | Spearman, last epoch of each trial | Spearman, every epoch of every trial | "
             "best by kNN = best by RankMe |", "|---|---:|---:|---:|---|"]
    for method, r in result["methods"].items():
        lines.append(f"| {method} | {r['trials']} | {r['spearman_last_epoch']:.2f} | {r['spearman_every_epoch']:.2f} "
                     f"({r['epochs']} epochs) | {'yes' if r['best_by_knn_is_best_by_rankme'] else 'no'} |")
    return "\n".join(lines)
