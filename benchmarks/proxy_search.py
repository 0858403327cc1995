"""Searching cheaply: a proxy search confirmed at the full setting, and a warm-started search.

    python -m benchmarks proxy         # the full pipeline against the proxy pipeline (~30 min on 2 cores)
    python -m benchmarks warm-start    # a search, then the same spec warm-started from it (~20 min)

**proxy.** The shipped TWIST spec as it is (the full pipeline: 16 trials of 8 epochs on all images, then the
2 best and the default raced on 2 to 8 seeds), against the same spec searched at a proxy (a quarter of
the images, 4 epochs) whose confirmation runs at the full setting (`search.confirm.overrides`), in the same
tracking store: the second search of the confirmation's setting, so its confirmation reuses the runs the
first one finished with the same identity (the default's, at least). Both confirmations train the same
seeds in the same order, so the two winners' difference is paired by seed. Compute is counted in
image-epochs (epochs trained x the images an epoch draws), the unit in which the two settings' epochs
compare: the runs each pipeline trained, and apart the runs it reused; the wall time of each pipeline is
given too.

**warm-start.** A search of the shipped spec (no confirmation), then the same spec with
`search.warm_start` naming it and another sampler seed. For each: the epochs it trains until its best
trial reaches the first search's best less the noise floor (one run's seed SD, `python -m benchmarks noise`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common

SPEC = common.REPO / "search_spaces" / "twist.yaml"
PROXY = ["data.subset=0.25", "training.epochs=4"]  # the full setting: all images, the spec's 8 epochs
NOISE_RESULT = common.RESULTS / "noise.json"  # `python -m benchmarks noise`: one run's seed SD of kNN top-1 here


def measured_noise_floor(path: Path = NOISE_RESULT) -> float:
    """The noise floor the noise benchmark measured on the bundled data (its `noise_floor_sd`)."""
    import json

    try:
        return float(json.loads(path.read_text())["noise_floor_sd"])
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"warm-start: no noise floor in {path} ({type(exc).__name__}: {exc}); run "
                         "`python -m benchmarks noise` first, or give --noise-floor") from None


@contextlib.contextmanager
def _work_dir(prefix: str) -> Iterator[Path]:
    """A directory for the searches' store and Ray storage, removed when the benchmark succeeds; kept, and
    named, when it fails, so that a failure in reading the results back loses no training."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"the searches' runs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def _search(work: Path, name: str, overrides: list[str]) -> float:
    """`ssl-tune run` of the shipped spec with `overrides` in `work`; returns its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "ssl-tune"), "run", str(SPEC), "--name", name,
                           *[x for o in overrides for x in ("--set", o)]], cwd=work, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {name} search failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def _image_epochs(client, runs: list, train_images: int) -> float:
    """Epochs trained x the images an epoch of each run's setting draws (`data.subset`)."""
    from ssl_tune.data.datasets import subset_size
    from ssl_tune.searching.space import param_value

    def subset(run) -> float | int | None:
        text = run.data.params.get("data.subset")
        return None if text in (None, "None") else param_value(text)

    return sum(run.data.metrics.get("epoch", 0) * subset_size(subset(run), train_images) for run in runs)


def _pipeline(client, name: str, seconds: float, train_images: int) -> dict[str, Any]:
    from ssl_tune import tracking
    from ssl_tune.searching import confirmation

    parent = tracking.find_parent_run(client, name)
    table = tracking.confirmation_table(client, parent)
    confirmations = tracking.child_runs(client, parent, tracking.KIND_CONFIRMATION)
    reused = [c for c in confirmations if tracking.TAG_REUSED_FROM in c.data.tags]  # counted, not trained here
    trained = [c for c in confirmations if tracking.TAG_REUSED_FROM not in c.data.tags]
    winner = confirmation.winner(table)
    seeds = {int(c.data.tags[tracking.TAG_SEED]): c.data.metrics.get(tracking.objective_of(parent)[0], math.nan)
             for c in tracking.child_runs(client, parent, tracking.KIND_CONFIRMATION)
             if winner and c.data.tags[tracking.TAG_CONFIRMS] == winner["confirms"]}
    return {
        "seconds": seconds,
        "search_image_epochs": _image_epochs(client, tracking.child_runs(client, parent, tracking.KIND_TRIAL), train_images),
        "confirmation_image_epochs": _image_epochs(client, trained, train_images),
        "reused_image_epochs": _image_epochs(client, reused, train_images),
        "runs_trained": len(trained), "runs_reused": len(reused),
        "rounds": int(parent.data.params.get("confirm.rounds", 0)),
        "winner": {k: winner[k] for k in ("configuration", "mean", "ci95_low", "ci95_high", "seeds")} if winner else None,
        "winner_by_seed": seeds,
        "default": next(({k: r[k] for k in ("mean", "ci95_low", "ci95_high")} for r in table if r["confirms"] == "default"),
                        None),
        "rank_spearman": parent.data.metrics.get("confirm_rank_spearman"),
        "verdict": parent.data.tags.get(tracking.TAG_VERDICT, ""),
    }


def run_proxy(args: argparse.Namespace) -> dict[str, Any]:
    from ssl_tune import tracking
    from ssl_tune.searching.confirmation import Interval
    from ssl_tune.data.datasets import load_bundled

    from ssl_tune.spec.files import load_spec

    train_images = len(load_bundled().ssl_images)
    overrides = list(args.set or [])
    full_spec = load_spec(SPEC, overrides)  # the setting the full pipeline searches and confirms at
    confirm_full = (f"search.confirm.overrides={{training.epochs: {full_spec.training.epochs}, "
                    f"data.subset: {'null' if full_spec.data.subset is None else full_spec.data.subset}}}")
    with _work_dir("ssl-tune-proxy-") as work:
        full_s = _search(work, "full", overrides)
        proxy_s = _search(work, "proxy", [*overrides, *args.proxy, confirm_full])
        client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
        pipelines = {name: _pipeline(client, name, seconds, train_images)
                     for name, seconds in (("full", full_s), ("proxy", proxy_s))}
    full, proxy = pipelines["full"], pipelines["proxy"]
    paired = [proxy["winner_by_seed"][s] - full["winner_by_seed"][s] for s in full["winner_by_seed"]
              if s in proxy["winner_by_seed"]]
    gap = Interval.of(paired)

    def total(p: dict[str, Any]) -> float:
        return p["search_image_epochs"] + p["confirmation_image_epochs"]

    return {"spec": common.repo_relative(SPEC), "overrides": overrides, "proxy": args.proxy, "confirm": confirm_full,
            "train_images": train_images, "full": full, "proxy_pipeline": proxy,
            "winner_gap": {"mean": gap.mean, "ci95_low": gap.low, "ci95_high": gap.high, "seeds": gap.n},
            "within_noise": not gap.excludes_zero(),
            "compute_ratio": total(proxy) / total(full),
            "compute_ratio_without_reuse": (total(proxy) + proxy["reused_image_epochs"]) / total(full),
            "search_compute_ratio": proxy["search_image_epochs"] / full["search_image_epochs"],
            "wall_ratio": proxy["seconds"] / full["seconds"]}


def _timeline(client, parent, metric: str) -> list[tuple[int, int, float]]:
    """Every trial's evaluated epochs in the order they happened, as (trial, epoch, objective)."""
    from ssl_tune import tracking

    events = []
    for index, run in enumerate(tracking.child_runs(client, parent, tracking.KIND_TRIAL)):
        events += [(m.timestamp, index, m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
    return [(index, step, value) for _, index, step, value in sorted(events)]


def run_warm_start(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.search_efficiency import best_so_far, compute_to_reach
    from ssl_tune import tracking

    if args.noise_floor is None:
        args.noise_floor = measured_noise_floor()

    overrides = ["search.confirm.top_k=0", *(args.set or [])]
    with _work_dir("ssl-tune-warm-start-") as work:
        cold_s = _search(work, "cold", overrides)
        warm_s = _search(work, "warm", [*overrides, "search.warm_start=[cold]", f"search.seed={args.warm_seed}"])
        client = tracking.client_for(f"sqlite:///{work}/mlflow.db")
        searches = {name: tracking.find_parent_run(client, name) for name in ("cold", "warm")}
        metric, mode = tracking.objective_of(searches["cold"])
        curves = {name: best_so_far(_timeline(client, p, metric), mode) for name, p in searches.items()}
        observations = int(searches["warm"].data.params.get("warm_start.observations", 0))
    sign = 1 if mode == "max" else -1
    target = curves["cold"][-1] - sign * args.noise_floor
    spent = {name: compute_to_reach(c, target, mode) for name, c in curves.items()}
    return {"spec": common.repo_relative(SPEC), "overrides": overrides, "warm_seed": args.warm_seed,
            "metric": metric, "mode": mode, "noise_floor": args.noise_floor, "target": target,
            "cold_best": curves["cold"][-1], "warm_best": curves["warm"][-1], "observations": observations,
            "epochs": {n: len(c) for n, c in curves.items()}, "epochs_to_target": spent,
            "seconds": {"cold": cold_s, "warm": warm_s},
            "ratio": spent["warm"] / spent["cold"] if math.isfinite(spent["warm"]) else math.inf}


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", help="change the shipped spec for both pipelines")
    parser.add_argument("--proxy", action="append", default=None, help=f"the proxy's settings (default: {' '.join(PROXY)})")


def add_warm_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", help="change the shipped spec for both searches")
    parser.add_argument("--warm-seed", type=int, default=1, help="the warm-started search's sampler seed")
    parser.add_argument("--noise-floor", type=float, default=None,
                        help="how far below the first search's best counts as reaching it (default: the seed SD "
                        f"the noise benchmark measured, {common.repo_relative(NOISE_RESULT)})")


def run_proxy_args(args: argparse.Namespace) -> dict[str, Any]:
    args.proxy = args.proxy or PROXY
    return run_proxy(args)


def report_proxy(result: dict[str, Any], figures: str) -> str:
    def row(name: str, p: dict[str, Any]) -> str:
        w = p["winner"]
        winner = f"{w['mean']:.2f} ({w['ci95_low']:.2f} to {w['ci95_high']:.2f})" if w else "none"
        d = p["default"]
        default = f"{d['mean']:.2f}" if d else "-"
        rho = p["rank_spearman"]
        return (f"| {name} | {winner} | {default} | {p['search_image_epochs'] / result['train_images']:.1f} | "
                f"{p['confirmation_image_epochs'] / result['train_images']:.1f} | {p.get('runs_trained', '-')} + "
                f"{p.get('runs_reused', 0)} in {p.get('rounds', 1)} round(s) | {p['seconds'] / 60:.1f} | "
                f"{'-' if rho is None else f'{rho:+.2f}'} |")

    g = result["winner_gap"]
    return "\n".join([
        f"Proxy: `{' '.join(result['proxy'])}`; its confirmation: `{result['confirm']}`. Compute in full-data "
        f"epochs ({result['train_images']:,} images each).", "",
        "| pipeline | winner's confirmed mean (95 % interval) | default's | search compute | confirmation compute "
        "| confirmation runs trained + reused | wall time (min) | rank transfer (Spearman) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
        row("full: search and confirm at the full setting", result["full"]),
        row("proxy: search at the proxy, confirm at the full setting", result["proxy_pipeline"]), "",
        f"The proxy pipeline's winner minus the full pipeline's, paired by seed: {g['mean']:+.2f} (95 % interval "
        f"{g['ci95_low']:+.2f} to {g['ci95_high']:+.2f}, {g['seeds']} seeds): "
        f"{'within' if result['within_noise'] else 'beyond'} the seed noise. Compute of the proxy pipeline: "
        f"**{result['compute_ratio']:.2f}** of the full pipeline's (its search {result['search_compute_ratio']:.2f} "
        f"of the full search's); wall time {result['wall_ratio']:.2f}.",
        *([f"Without reusing the full pipeline's runs it would have trained "
           f"**{result['compute_ratio_without_reuse']:.2f}**."] if "compute_ratio_without_reuse" in result else []),
        "", "Verdicts: full: " + result["full"].get("verdict", "-") + "; proxy: "
        + result["proxy_pipeline"].get("verdict", "-") + "."])


def report_warm_start(result: dict[str, Any], figures: str) -> str:
    spent = result["epochs_to_target"]

    def shown(v: float) -> str:
        return f"{v:.0f}" if math.isfinite(v) else "not reached"

    return "\n".join([
        f"Target: the first search's best, {result['cold_best']:.2f}, less the noise floor {result['noise_floor']:.2f} "
        f"= {result['target']:.2f} ({result['metric']}). The warm-started search had {result['observations']} "
        "observations from the first before its first trial.", "",
        "| search | epochs to reach the target | epochs in all | best | wall time (min) |", "|---|---:|---:|---:|---:|",
        f"| cold (sampler seed 0) | {shown(spent['cold'])} | {result['epochs']['cold']} | {result['cold_best']:.2f} | "
        f"{result['seconds']['cold'] / 60:.1f} |",
        f"| warm-started from it (sampler seed {result['warm_seed']}) | {shown(spent['warm'])} | "
        f"{result['epochs']['warm']} | {result['warm_best']:.2f} | {result['seconds']['warm'] / 60:.1f} |", "",
        f"Epochs the warm-started search needs, over the cold search's: **{result['ratio']:.2f}**."])

