"""Overhead of a search: `ssl-tune run` wall time against the same trials as bare trainer calls.

    python -m benchmarks.search_overhead [--trials 3] [--epochs 6] [--workers 1]

Runs an N-trial search of search_spaces/twist.yaml one trial at a time with no early stopping
(every trial does all its epochs, using all the machine's cores), then trains the same N sampled
configurations with `trainers.loop.Trainer` in this process, one after the other. Reports both wall
times, their ratio (target <= 1.15 for trials of >= 60 s of work) and the fixed cost per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(Path(__file__).parents[1] / "search_spaces" / "twist.yaml"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (6 is about 60 s on 2 cores)")
    parser.add_argument("--workers", type=int, default=1, help="DDP workers per trial")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    from ssl_tune import tracking
    from ssl_tune.search import run_search
    from ssl_tune.spec import load_spec
    from trainers.loop import Trainer

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ssl-tune-overhead-") as work:
        overrides = [
            f"training.epochs={args.epochs}", f"search.num_samples={args.trials}", "search.scheduler=none",
            "search.max_concurrent=1", f"resources.num_workers={args.workers}",
            f"resources.cpus_per_worker={(cores - 0.05) / args.workers:.2f}",
            f"storage_path={work}/ray", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            "evaluation.linear_probe=false",
        ]
        spec = load_spec(args.spec, overrides)
        start = time.perf_counter()
        outcome = run_search(spec, spec_source=args.spec, name="overhead", verbose=0)
        search_s = time.perf_counter() - start

        client = tracking.client_for(outcome.tracking_uri)
        searched = list(spec.search_ranges())
        configs = []
        for row in outcome.rows:
            params = client.get_run(row["run_id"]).data.params
            configs.append({p: tracking._param_value(params[p]) for p in searched})
        torch.set_num_threads(cores)
        start = time.perf_counter()
        for config in configs:
            Trainer(spec.resolve(config)).fit()
        bare_s = time.perf_counter() - start

    result = {
        "trials": args.trials, "epochs_per_trial": args.epochs, "workers_per_trial": args.workers, "cores": cores,
        "search_wall_s": search_s, "bare_wall_s": bare_s, "ratio": search_s / bare_s,
        "work_per_trial_s": bare_s / args.trials, "fixed_cost_per_trial_s": (search_s - bare_s) / args.trials,
    }
    print(f"{args.trials} trials x {args.epochs} epochs, {args.workers} worker(s) per trial, {cores} cores")
    print(f"  search (ssl-tune run)   {search_s:7.1f} s")
    print(f"  bare trainer calls      {bare_s:7.1f} s   ({result['work_per_trial_s']:.0f} s of work per trial)")
    print(f"  ratio                   {result['ratio']:7.3f}   (target <= 1.15 for trials of >= 60 s)")
    print(f"  fixed cost per trial    {result['fixed_cost_per_trial_s']:7.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
