"""Overhead of a search: `ssl-tune run` wall time against the same trials as bare trainer calls.

    python -m benchmarks search-overhead [--trials 3] [--epochs 6] [--workers 1 2]

For each number of DDP workers per trial: an N-trial search of search_spaces/twist.yaml (without its
confirmation stage) runs one trial at a time with no early stopping (every trial does all its epochs on
all the machine's cores), then the same N sampled configurations are trained by `trainers.loop.Trainer`
with the same threads: in this process for 1 worker, on a gloo process group of the same size otherwise.
Reported: the ratio of the wall times (target <= 1.15 for trials of >= 60 s of work) and the fixed
cost per trial in seconds (Ray, Tune, Train start-up, MLflow logging, checkpoints, figures).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

SPEC = str(common.REPO / "search_spaces" / "twist.yaml")


def _train_configs(rank: int, spec_dict: dict, configs: list[dict[str, Any]], threads: int) -> None:
    from trainers import spec_model
    from trainers.loop import Trainer

    torch.set_num_threads(threads)
    spec = spec_model().model_validate(spec_dict)
    for config in configs:
        Trainer(spec.resolve(config)).fit()


def measure(spec_path: str, trials: int, epochs: int, workers: int) -> dict[str, Any]:
    from ssl_tune import tracking
    from ssl_tune.searching.space import param_value
    from ssl_tune.spec.files import load_spec
    from tests.ranks import run_on_ranks  # (the bare DDP loop it compares with)
    from ssl_tune.searching.driver import run_search

    cores = os.cpu_count() or 1
    cpus_per_worker = (cores - 0.05) / workers  # what is left after the Train driver's 0.01 CPU
    with tempfile.TemporaryDirectory(prefix="ssl-tune-overhead-") as work:
        overrides = [
            # The search alone: the shipped spec's confirmation stage would add trials the bare loop does not train.
            f"training.epochs={epochs}", f"search.num_samples={trials}", "search.scheduler=none", "search.confirm.top_k=0",
            "search.max_concurrent=1", f"resources.num_workers={workers}",
            f"resources.cpus_per_worker={cpus_per_worker:.2f}",
            f"storage_path={work}/ray", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            "evaluation.linear_probe=false",
        ]
        spec = load_spec(spec_path, overrides)
        start = time.perf_counter()
        outcome = run_search(spec, spec_source=spec_path, name="overhead", verbose=False)
        search_s = time.perf_counter() - start

        client = tracking.client_for(outcome.tracking_uri)
        trained = len(tracking.child_runs(client, client.get_run(outcome.parent_run_id), kind=None))
        if trained != trials:
            raise SystemExit(f"search-overhead: the search trained {trained} runs, not the {trials} trials it compares")
        searched = list(spec.search_ranges())
        configs = []
        for row in outcome.rows:
            params = client.get_run(row["run_id"]).data.params
            configs.append({p: param_value(params[p]) for p in searched})
    threads = max(1, int(cpus_per_worker + 0.99))  # as a search's worker sets it
    spec_dict = spec.model_dump(mode="json")
    start = time.perf_counter()
    if workers == 1:
        _train_configs(0, spec_dict, configs, threads)
    else:
        run_on_ranks(_train_configs, workers, spec_dict, configs, threads, timeout=3600)
    bare_s = time.perf_counter() - start
    return {
        "workers_per_trial": workers, "trials": trials, "epochs_per_trial": epochs, "cores": cores,
        "search_wall_s": search_s, "bare_wall_s": bare_s, "ratio": search_s / bare_s,
        "work_per_trial_s": bare_s / trials, "fixed_cost_per_trial_s": (search_s - bare_s) / trials,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default=SPEC)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (6 is about 60 s on 2 cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DDP workers per trial")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for workers in args.workers:
        row = measure(args.spec, args.trials, args.epochs, workers)
        rows.append(row)
        print(f"{workers} worker(s) per trial: search {row['search_wall_s']:.1f} s, bare {row['bare_wall_s']:.1f} s "
              f"({row['work_per_trial_s']:.0f} s of work per trial), ratio {row['ratio']:.3f}, "
              f"fixed cost {row['fixed_cost_per_trial_s']:.1f} s per trial", flush=True)
    return {"spec": Path(args.spec).name, "rows": rows}


def report(result: dict[str, Any], figures: str) -> str:
    lines = ["| workers per trial | trials x epochs | work per trial (bare) | search / bare wall time | fixed cost per trial |",
             "|---:|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['workers_per_trial']} | {r['trials']} x {r['epochs_per_trial']} | "
                     f"{r['work_per_trial_s']:.0f} s | {r['ratio']:.3f} | {r['fixed_cost_per_trial_s']:.1f} s |")
    return "\n".join(lines)
