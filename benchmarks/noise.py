"""Seed noise and the label-free objective: how far apart must two configurations be to differ?

    python -m benchmarks noise [--every 2] [--seeds 3] [--processes 2]    # ~30 min on 2 cores

Trains a subgrid of the efficiency grid (every `--every`-th value of each searched range, from the
second) with `--seeds` fresh training seeds per point, recording kNN top-1 and RankMe after every
epoch. It reports:

* the **noise floor**: the seed-to-seed standard deviation of the final objective of one
  configuration (pooled over the points), which is what one training run of a search can tell apart;
* whether the search-efficiency strategies differ by more than it (their best-at-budget means);
* **RankMe against kNN top-1**: Spearman's rank correlation over the points (seed means) and over
  every run, so the README can say when the label-free objective can stand in for kNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.search_efficiency import _train_point

LABEL_FREE = "rankme"


def subgrid(table: dict[str, Any], every: int) -> list[dict[str, float]]:
    """Every `every`-th value of each axis of the efficiency grid, from the second."""
    axes = {path: values[1::every] for path, values in table["axes"].items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def measure(table_path: Path, every: int, seeds: int, processes: int, out: Path) -> dict[str, Any]:
    """Train every (point, seed) not yet in `out` and return the runs."""
    import multiprocessing

    from ssl_tune.spec.files import load_spec

    table = json.loads(table_path.read_text())
    spec = load_spec(common.REPO / table["spec"], [*table["overrides"], "evaluation.linear_probe=false",
                                                   "evaluation.eval_every=1"])
    runs: dict[str, Any] = (json.loads(out.read_text()) if out.exists()
                            else {"table": common.repo_relative(table_path), "runs": []})
    done = {json.dumps([r["values"], r["seed"]], sort_keys=True) for r in runs["runs"]}
    seeds_to_run = [spec.training.seed + s for s in range(1, seeds + 1)]  # fresh: the grid was trained on the spec's seed
    todo = [(point, seed) for point in subgrid(table, every) for seed in seeds_to_run
            if json.dumps([point, seed], sort_keys=True) not in done]
    print(f"{len(todo)} runs to train, {processes} at a time", flush=True)
    base = spec.model_dump(mode="json")
    jobs = [({**base, "training": {**base["training"], "seed": seed}}, point) for point, seed in todo]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for row in pool.imap_unordered(_train_point, jobs):
            runs["runs"].append(row)
            out.write_text(json.dumps(runs, indent=1))  # a crash keeps every finished run
            print(f"  [{len(runs['runs'])}] {row['values']} seed {row['seed']}: {row['status']}, kNN "
                  f"{row['curve'][-1]:.2f}, {LABEL_FREE} {row[LABEL_FREE][-1]:.2f}, {row['seconds']:.0f} s", flush=True)
    return runs


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else math.nan


def summarise(runs: list[dict[str, Any]], efficiency: dict[str, Any] | None) -> dict[str, Any]:
    """Noise floor, per-point statistics, strategy gaps against the floor, RankMe-kNN correlations."""
    points: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["status"] == "finished":
            key = json.dumps({k: v for k, v in run["values"].items() if k != "training.seed"}, sort_keys=True)
            points.setdefault(key, []).append(run)
    per_point = []
    for key, rs in points.items():
        knn, rank = [r["curve"][-1] for r in rs], [r[LABEL_FREE][-1] for r in rs]
        per_point.append({"values": json.loads(key), "seeds": len(rs), "knn_mean": statistics.mean(knn),
                          "knn_sd": statistics.stdev(knn) if len(knn) > 1 else math.nan,
                          "rankme_mean": statistics.mean(rank)})
    with_sd = [p for p in per_point if p["seeds"] > 1]
    # Pooled within-configuration SD: sqrt of the mean variance, weighted by degrees of freedom.
    dof = sum(p["seeds"] - 1 for p in with_sd)
    floor = math.sqrt(sum((p["seeds"] - 1) * p["knn_sd"] ** 2 for p in with_sd) / dof) if dof else math.nan
    finished = [r for rs in points.values() for r in rs]
    result = {
        "noise_floor_sd": floor, "noise_floor_dof": dof, "points": per_point,
        "spearman_points": spearman([p["rankme_mean"] for p in per_point], [p["knn_mean"] for p in per_point]),
        "spearman_runs": spearman([r[LABEL_FREE][-1] for r in finished], [r["curve"][-1] for r in finished]),
        "spearman_per_epoch_runs": spearman([v for r in finished for v in r[LABEL_FREE]],
                                            [v for r in finished for v in r["curve"]]),
    }
    if efficiency:
        # A strategy's best-at-budget is one trained run: a gap under ~2 noise SDs (the SD of a
        # difference of two runs is sqrt(2) floor, ~2 of those for 95%) is not seen by a search.
        finals = {name: v["mean"] for name, v in efficiency["final_best"].items()}
        reference = finals.get("random")
        result["strategy_gaps"] = {name: {"gap_to_random": mean - reference,
                                          "exceeds_noise": abs(mean - reference) > 2 * math.sqrt(2) * floor}
                                   for name, mean in finals.items() if reference is not None}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table-file", type=Path, help="default: efficiency-table.json in the results directory")
    parser.add_argument("--every", type=int, default=2, help="take every N-th grid value per range")
    parser.add_argument("--seeds", type=int, default=3, help="fresh training seeds per point")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    table = args.table_file or args.results / "efficiency-table.json"
    runs = measure(table, args.every, args.seeds, args.processes, args.results / "noise-runs.json")
    efficiency_path = args.results / "efficiency.json"
    efficiency = json.loads(efficiency_path.read_text()) if efficiency_path.exists() else None
    return {"every": args.every, "seeds": args.seeds, **summarise(runs["runs"], efficiency)}


def report(result: dict[str, Any], figures: str) -> str:
    lines = [f"{len(result['points'])} configurations of the efficiency grid x {result['seeds']} fresh training seeds "
             f"(8 epochs each). Noise floor (pooled seed-to-seed SD of one configuration's final kNN top-1): "
             f"**{result['noise_floor_sd']:.2f} points** ({result['noise_floor_dof']} degrees of freedom).", "",
             "| configuration | kNN top-1 mean | SD over seeds | RankMe mean |", "|---|---:|---:|---:|"]
    for p in sorted(result["points"], key=lambda p: -p["knn_mean"]):
        shown = ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in p["values"].items())
        lines.append(f"| {shown} | {p['knn_mean']:.2f} | {p['knn_sd']:.2f} | {p['rankme_mean']:.2f} |")
    lines += ["", f"RankMe against kNN top-1 (Spearman): {result['spearman_points']:.2f} over the configurations' "
              f"means, {result['spearman_runs']:.2f} over every run's last epoch, "
              f"{result['spearman_per_epoch_runs']:.2f} over every epoch of every run."]
    gaps = result.get("strategy_gaps")
    if gaps:
        lines += ["", "Search strategies (efficiency benchmark, best at budget) against random search, and whether the "
                  "gap exceeds the noise of comparing two single runs (2 x sqrt(2) x floor = "
                  f"{2 * math.sqrt(2) * result['noise_floor_sd']:.2f}):", "",
                  "| strategy | gap to random | beyond noise |", "|---|---:|---|"]
        lines += [f"| {name} | {g['gap_to_random']:+.2f} | {'yes' if g['exceeds_noise'] else 'no'} |"
                  for name, g in gaps.items()]
    return "\n".join(lines)
