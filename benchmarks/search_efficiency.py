"""Search efficiency: TPE + ASHA against random search, TPE alone and Optuna's other samplers, at the same budget.

    python -m benchmarks efficiency-table [--points 6] [--processes 2]     # trains the grid (~30 min)
    python -m benchmarks efficiency [--seeds 10] [--budget-trials 12]      # replays searches on it

A tabular benchmark, the standard way to compare optimisers over many seeds without paying for
every trial again (Klein et al., "Tabular Benchmarks for Joint Architecture and Hyperparameter
Optimization", 2019; Eggensperger et al., 2015):

1. `efficiency-table` trains every point of a grid over the spec's searched ranges with the real
   trainer on the bundled data and records each point's objective after every epoch.
2. `efficiency` replays searches on that table: the proposals and stopping decisions come from
   the objects `ssl-tune run` builds from the spec (`build_search_algorithm`, `build_scheduler`),
   and a trial reports the recorded objectives of the grid point nearest to its sampled values (in
   the range's sampling scale) instead of training. Compute is counted in epochs trained, the unit
   in which every configuration costs the same. Each strategy gets the same budget; the best
   objective reached is recorded as a function of the epochs spent.

Strategies: TPE + ASHA (the default), random search + ASHA, TPE without early stopping, random
search, both TPE strategies with Optuna's default of 10 random start-up trials, and GP, CMA-ES and
quasi-Monte Carlo (`search.sampler`) with ASHA. The target is random
search's mean best objective at the full budget; reported is the compute each strategy's mean curve needs
to reach it, and its ratio to random search's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

DEFAULT_SPEC = common.REPO / "search_spaces" / "twist.yaml"
# TWIST's two most important parameters are searched (lr and tau); its entropy weights stay at
# their defaults so a grid can cover the space densely enough to replay any sampled point.
DEFAULT_FIXED = ["method.lam1=0.0", "method.lam2=1.0"]
FIGURE = "search_efficiency.png"
STRATEGIES = {  # name -> (sampler, scheduler, TPE's random start-up trials; None: the product's default)
    "TPE + ASHA": ("tpe", "asha", None),
    "random + ASHA": ("random", "asha", None),
    "TPE": ("tpe", "none", None),
    "random": ("random", "none", None),
    # Optuna's own default start-up (10 trials), which ssl-tune used before this benchmark.
    "TPE + ASHA, 10 start-up": ("tpe", "asha", 10),
    "TPE, 10 start-up": ("tpe", "none", 10),
    # Optuna's other samplers (`search.sampler`), with ASHA as the product runs them.
    "GP + ASHA": ("gp", "asha", None),
    "CMA-ES + ASHA": ("cmaes", "asha", None),
    "QMC + ASHA": ("qmc", "asha", None),
}


def grid_axes(spec, points: int) -> dict[str, list[float]]:
    """`points` values per searched range, evenly spaced in the range's sampling scale."""
    from ssl_tune.spec import LogUniform, Uniform

    axes = {}
    for path, r in spec.search_ranges().items():
        if isinstance(r, LogUniform):
            axes[path] = np.geomspace(r.low, r.high, points).tolist()
        elif isinstance(r, Uniform):
            axes[path] = np.linspace(r.low, r.high, points).tolist()
        else:
            raise SystemExit(f"efficiency-table: {path} is not a uniform or loguniform range; fix it with --set")
    return axes


def _train_point(args: tuple[dict, dict[str, float]]) -> dict[str, Any]:
    spec_dict, values = args
    import torch

    from trainers import spec_model
    from trainers.loop import Trainer

    torch.set_num_threads(1)  # one core per process; the pool runs one process per core
    spec = spec_model().model_validate(spec_dict).resolve(values)
    start = time.perf_counter()
    result = Trainer(spec).fit()
    metric = spec.search.metric
    return {
        "values": values,
        "seed": spec.training.seed,
        "status": result.status,
        "curve": [h[metric] for h in result.history],  # objective after each completed epoch
        "rankme": [h["rankme"] for h in result.history],  # the label-free score, for the noise benchmark
        "diverged_reason": result.message or None,
        "seconds": time.perf_counter() - start,
    }


def measure_table(spec_path: str, overrides: list[str], points: int, processes: int, out: Path) -> dict[str, Any]:
    """Train every grid point (resuming a partial table at `out`) and return the table."""
    import multiprocessing

    from ssl_tune.spec.files import load_spec

    spec = load_spec(spec_path, [*overrides, "evaluation.linear_probe=false", "evaluation.eval_every=1"])
    axes = grid_axes(spec, points)
    table = json.loads(out.read_text()) if out.exists() else {}
    if table.get("axes") != axes or table.get("overrides") != overrides:
        table = {"spec": common.repo_relative(spec_path), "overrides": overrides, "metric": spec.search.metric,
                 "mode": spec.search.mode, "epochs": spec.training.epochs, "axes": axes, "points": []}
    done = {tuple(p["values"][k] for k in axes) for p in table["points"]}
    todo = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values()) if combo not in done]
    print(f"grid of {points}^{len(axes)} points over {', '.join(axes)}: {len(todo)} to train, {processes} at a time")
    spec_dict = spec.model_dump(mode="json")
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for row in pool.imap_unordered(_train_point, [(spec_dict, v) for v in todo]):
            table["points"].append(row)
            out.write_text(json.dumps(table, indent=1))  # a crash keeps every finished point
            shown = ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in row["values"].items())
            last = row["curve"][-1] if row["curve"] else math.nan
            print(f"  [{len(table['points'])}/{points ** len(axes)}] {shown}: {row['status']}, "
                  f"objective {last:.4f}, {row['seconds']:.0f} s", flush=True)
    return table


# --- replaying searches -----------------------------------------------------------------------


class TableLookup:
    """Maps sampled values to the nearest grid point's recorded curve."""

    def __init__(self, table: dict[str, Any], spec) -> None:
        from ssl_tune.spec import LogUniform

        self.axes = table["axes"]
        self.log = {p: isinstance(spec.search_ranges()[p], LogUniform) for p in self.axes}
        self.rows = {tuple(p["values"][k] for k in self.axes): p for p in table["points"]}

    def _nearest(self, path: str, value: float) -> float:
        scale = math.log if self.log[path] else float
        return min(self.axes[path], key=lambda g: abs(scale(g) - scale(value)))

    def row(self, values: dict[str, float]) -> dict[str, Any]:
        return self.rows[tuple(self._nearest(p, values[p]) for p in self.axes)]


def replay_search(table: dict[str, Any], spec, sampler: str, scheduler: str, seed: int,
                  budget: int, startup_trials: int | None = None) -> list[tuple[int, int, float]]:
    """One search of `budget` epochs; returns its results in arrival order as (trial, epoch, objective).

    The proposals and stopping decisions come from the objects `ssl-tune run` builds
    (`build_search_algorithm`, `build_scheduler`). Tune's event loop is replaced by a discrete-event
    loop that calls them as Tune's controller does: `max_concurrent` trials run at once, every epoch
    takes one time unit, and a free slot is filled at once with the searcher's next proposal.
    """
    import heapq
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from ssl_tune.searching.algorithms import build_scheduler, build_search_algorithm
    from ssl_tune.searching.space import field_values

    spec = spec.model_copy(deep=True)
    spec.search.sampler, spec.search.scheduler, spec.search.seed = sampler, scheduler, seed
    spec.search.startup_trials = startup_trials
    concurrency = spec.search.max_concurrent or 2
    np.random.seed(seed)  # ASHA draws a bracket per trial from numpy's global generator
    searcher, trial_scheduler = build_search_algorithm(spec, concurrency), build_scheduler(spec)
    lookup, metric = TableLookup(table, spec), table["metric"]
    events: list[tuple[float, int]] = []  # (time the trial's next epoch ends, trial index)
    curves: dict[int, list[float]] = {}
    trials: list[SimpleNamespace] = []
    results: list[tuple[int, int, float]] = []
    now = 0.0
    while len(results) < budget:
        while len(events) < concurrency:  # free slots get new trials
            trial = SimpleNamespace(trial_id=f"t{len(trials)}", index=len(trials))
            config = searcher.suggest(trial.trial_id)
            row = lookup.row(field_values(config))
            curves[trial.index] = row["curve"] + ([math.nan] if row["status"] == "diverged" else [])
            trials.append(trial)
            trial_scheduler.on_trial_add(None, trial)
            heapq.heappush(events, (now + 1, trial.index))
        now, index = heapq.heappop(events)
        trial = trials[index]
        epoch = len([r for r in results if r[0] == index]) + 1
        value = curves[index][epoch - 1]
        results.append((index, epoch, value))
        result = {"epoch": epoch, "training_iteration": epoch, metric: value}
        decision = trial_scheduler.on_trial_result(None, trial, result)
        if decision == TrialScheduler.STOP or epoch == len(curves[index]):
            trial_scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial.trial_id, result=result)
        else:
            searcher.on_trial_result(trial.trial_id, result)
            heapq.heappush(events, (now + 1, index))
    return results


ONE_EPOCH_BASELINE = "every point 1 epoch, top few in full"


def one_epoch_then_top(table: dict[str, Any], seed: int, budget: int) -> list[tuple[int, int, float]]:
    """The simple baseline: every grid point trained for one epoch (in an order shuffled by `seed`),
    then as many of the best as the rest of the budget allows trained to the end, best first."""
    import random

    mode, epochs = table["mode"], table["epochs"]
    points = [p for p in table["points"] if p["curve"]]
    random.Random(seed).shuffle(points)
    results = [(i, 1, p["curve"][0]) for i, p in enumerate(points)]
    sign = -1 if mode == "max" else 1
    order = sorted(range(len(points)), key=lambda i: sign * points[i]["curve"][0] if math.isfinite(points[i]["curve"][0])
                   else math.inf)
    for i in order:
        curve = points[i]["curve"]
        if len(results) + len(curve) - 1 > budget or len(curve) < epochs:  # out of budget, or diverged
            continue
        results += [(i, epoch, curve[epoch - 1]) for epoch in range(2, len(curve) + 1)]
    return results[:budget]


def best_so_far(results: list[tuple[int, int, float]], mode: str) -> list[float]:
    """Best objective among the trials' latest values, after each epoch of compute.

    A trial's latest value is what the search's leaderboard ranks it by."""
    from ssl_tune.searching.space import best_value

    latest: dict[int, float] = {}
    curve = []
    for index, _, value in results:
        latest[index] = value
        best = best_value(latest.values(), mode)
        curve.append(math.nan if best is None else best)
    return curve


def compute_to_reach(curve: list[float], target: float, mode: str) -> float:
    """Epochs after which `curve` first reaches `target` (inf if it never does)."""
    from ssl_tune.searching.space import better, counts

    for spent, value in enumerate(curve, 1):
        if counts(value) and not better(target, value, mode):  # value at least as good as target
            return float(spent)
    return math.inf


def _print_strategy(name: str, curves: list[list[float]], trials: list[int], budget: int, seeds: int) -> None:
    finals = [c[-1] for c in curves]
    print(f"  {name:24s} best after {budget} epochs: {statistics.mean(finals):.2f} (mean of {seeds} seeds), "
          f"{statistics.mean(trials):.1f} trials on average", flush=True)


def run_efficiency(table_path: Path, seeds: int, budget_trials: int) -> dict[str, Any]:
    import logging

    import optuna

    from ssl_tune.spec.files import load_spec

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)  # NaN of a diverged trial

    table = json.loads(table_path.read_text())
    spec = load_spec(common.REPO / table["spec"], table["overrides"])  # an absolute path stays as it is
    mode, epochs = table["mode"], table["epochs"]
    budget = budget_trials * epochs
    curves: dict[str, list[list[float]]] = {}
    trials: dict[str, list[int]] = {}
    start = time.perf_counter()
    for name, (sampler, scheduler, startup) in STRATEGIES.items():
        for seed in range(seeds):
            results = replay_search(table, spec, sampler, scheduler, seed, budget, startup)
            curves.setdefault(name, []).append(best_so_far(results, mode))
            trials.setdefault(name, []).append(len({i for i, _, _ in results}))
        _print_strategy(name, curves[name], trials[name], budget, seeds)
    for seed in range(seeds):
        results = one_epoch_then_top(table, seed, budget)
        curve = best_so_far(results, mode)
        curves.setdefault(ONE_EPOCH_BASELINE, []).append(curve + [curve[-1]] * (budget - len(curve)))
        trials.setdefault(ONE_EPOCH_BASELINE, []).append(len({i for i, _, _ in results}))
    _print_strategy(ONE_EPOCH_BASELINE, curves[ONE_EPOCH_BASELINE], trials[ONE_EPOCH_BASELINE], budget, seeds)
    mean = {name: np.mean(c, axis=0).tolist() for name, c in curves.items()}
    target = mean["random"][-1]
    to_target = {name: compute_to_reach(m, target, mode) for name, m in mean.items()}
    grid_best = max(p["curve"][-1] for p in table["points"] if p["curve"] and p["status"] == "finished")
    return {
        "table": common.repo_relative(table_path), "seeds": seeds, "budget_epochs": budget, "budget_trials": budget_trials,
        "epochs_per_trial": epochs, "grid_points": len(table["points"]), "grid_best": grid_best,
        "target": target, "mean_curve": mean, "curves": curves, "trials": trials,
        "compute_to_target": to_target,
        "ratio_to_random": {n: c / to_target["random"] for n, c in to_target.items()},
        "seeds_reaching_target": {
            n: sum(compute_to_reach(c, target, mode) < math.inf for c in cs) for n, cs in curves.items()},
        "final_best": {n: {"mean": statistics.mean(c[-1] for c in cs),
                           "stdev": statistics.stdev(c[-1] for c in cs) if seeds > 1 else 0.0}
                       for n, cs in curves.items()},
        "replay_seconds": time.perf_counter() - start,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    epochs = result["epochs_per_trial"]
    for name, curves in result["curves"].items():
        c = np.array(curves)
        x = np.arange(1, c.shape[1] + 1) / epochs
        (line,) = ax.plot(x, c.mean(axis=0), label=name, ls="--" if "start-up" in name else "-")
        if name in ("TPE + ASHA", "random"):  # the spread of the two ends only, so the plot stays readable
            ax.fill_between(x, np.percentile(c, 25, axis=0), np.percentile(c, 75, axis=0), alpha=0.12,
                            color=line.get_color())
    ax.axhline(result["target"], color="grey", ls=":", lw=1, label="target: random's mean best")
    ax.axhline(result["grid_best"], color="black", ls=":", lw=1, label="best point of the grid")
    low = min(np.mean(c, axis=0)[epochs - 1] for c in result["curves"].values())
    ax.set_ylim(low - 0.5, result["grid_best"] + 0.2)
    ax.set_xlabel("compute spent (full-trial equivalents; 1 = one trial of all epochs)")
    ax.set_ylabel("best objective so far (mean over seeds)")
    ax.set_title(f"{result['seeds']} seeds per strategy; bands: 25th-75th percentile")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser, *, table: bool) -> None:
    parser.add_argument("--table-file", type=Path, help="default: efficiency-table.json in the results directory")
    if table:
        parser.add_argument("--spec", default=str(DEFAULT_SPEC))
        parser.add_argument("--set", action="append", default=None,
                            help=f"fix or change ranges (default: {' '.join(DEFAULT_FIXED)})")
        parser.add_argument("--points", type=int, default=6, help="grid points per searched range")
        parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    else:
        parser.add_argument("--seeds", type=int, default=30)
        parser.add_argument("--budget-trials", type=int, default=12, help="budget in full-trial equivalents")


def _table_file(args: argparse.Namespace) -> Path:
    return args.table_file or args.results / "efficiency-table.json"


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    overrides = DEFAULT_FIXED if args.set is None else args.set
    return measure_table(args.spec, overrides, args.points, args.processes, _table_file(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = run_efficiency(_table_file(args), args.seeds, args.budget_trials)
    plot(result, args.results / FIGURE)
    return result


def report_table(table: dict[str, Any], figures: str) -> str:
    """The grid's final objective, one row per value of the first range."""
    (row_path, rows), (col_path, cols) = list(table["axes"].items())[:2]
    final = {tuple(p["values"][k] for k in (row_path, col_path)):
             (p["curve"][-1] if p["status"] == "finished" else math.nan) for p in table["points"]}
    lines = [f"Final {table['metric']} after {table['epochs']} epochs on the grid ({len(table['points'])} points; "
             f"fixed: {', '.join(table['overrides']) or 'nothing'}). Rows: {row_path}, columns: {col_path}.", "",
             f"| {row_path} \\ {col_path} | " + " | ".join(f"{c:.3g}" for c in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [final.get((r, c), math.nan) for c in cols]
        lines.append(f"| {r:.3g} | " + " | ".join("diverged" if math.isnan(v) else f"{v:.2f}" for v in cells) + " |")
    return "\n".join(lines)


def report(result: dict[str, Any], figures: str) -> str:
    epochs = result["epochs_per_trial"]
    lines = [f"{result['seeds']} seeds per strategy, budget {result['budget_epochs']} epochs "
             f"({result['budget_trials']} full trials of {epochs} epochs). Target: random search's mean best "
             f"objective at the full budget, {result['target']:.2f} (best point of the grid: {result['grid_best']:.2f}).",
             "", "| strategy | best at budget (mean ± sd) | trials started (mean) | compute to target | "
             "relative to random | seeds reaching target |", "|---|---:|---:|---:|---:|---:|"]
    for name, final in result["final_best"].items():
        spent = result["compute_to_target"][name]
        to_target = f"{spent / epochs:.1f} trials" if math.isfinite(spent) else "not reached"
        ratio = result["ratio_to_random"][name]
        lines.append(f"| {name} | {final['mean']:.2f} ± {final['stdev']:.2f} | "
                     f"{statistics.mean(result['trials'][name]):.1f} | {to_target} | "
                     f"{ratio:.2f} | {result['seeds_reaching_target'][name]} / {result['seeds']} |"
                     if math.isfinite(ratio) else
                     f"| {name} | {final['mean']:.2f} ± {final['stdev']:.2f} | "
                     f"{statistics.mean(result['trials'][name]):.1f} | {to_target} | - | "
                     f"{result['seeds_reaching_target'][name]} / {result['seeds']} |")
    lines += ["", f"![best objective against compute]({figures}/{FIGURE})"]
    return "\n".join(lines)
