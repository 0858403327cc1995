"""One 2-worker DDP trial on two hosts against the same trial on one host.

    python -m benchmarks cluster [--epochs 4] [--repeats 2] [--set FIELD=VALUE]    # needs root (network namespaces)

The hosts are two network namespaces joined by a veth pair (`scripts/netns_cluster.py`), so the two
workers' gradients and the global-batch gathers cross a real network link. One host: both workers on
the first namespace's node (2 CPUs, the second node with none). Two hosts: one worker on each (1 CPU
each, `placement_strategy: SPREAD`). The measure is the median epoch time of the trial after its first
epoch (which includes starting the workers), read from Tune's result file; the figure reported is the
ratio two hosts / one host, measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks import common

PREFIX, SUBNET = "sslbench", "10.213.251"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="trials per layout, alternating the layouts")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a spec override for both layouts' trial (as `ssl-tune run --set`)")


def _spec(epochs: int, batch_size: int, spread: bool) -> dict[str, Any]:
    raw = yaml.safe_load((common.REPO / "search_spaces" / "twist.yaml").read_text())
    raw.update(name="bench-cluster", backbone={"name": "small_cnn", "width": 16},
               evaluation={"eval_every": 1, "linear_probe": False})
    raw["training"] = {"epochs": epochs, "batch_size": batch_size, "seed": 0}
    raw["method"]["tau"] = {"type": "uniform", "low": 0.9, "high": 1.1}  # one range: `run` needs something to search
    for key in ("lam1", "lam2"):
        value = raw["method"][key]
        raw["method"][key] = value.get("default", 0.0) if isinstance(value, dict) else value
    raw["optimizer"]["lr"] = 1.0
    raw["search"] = {"num_samples": 1, "scheduler": "none", "metric": "loss", "mode": "min"}
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.9, "placement_strategy": "SPREAD" if spread else "PACK"}
    return raw


def _one_trial(two_hosts: bool, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(common.REPO / "scripts"))
    import netns_cluster

    netns_cluster.up(PREFIX, SUBNET)
    cluster_dir = work / "cluster"
    try:
        ray = netns_cluster.start_ray(PREFIX, SUBNET, cluster_dir, cpus=1 if two_hosts else 2,
                                      worker_cpus=1 if two_hosts else 0)
        (work / "spec.yaml").write_text(yaml.safe_dump(_spec(args.epochs, args.batch_size, two_hosts)))
        env = {**os.environ, **ray["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "RAY_ADDRESS": ""}
        ssl_tune = str(Path(sys.executable).parent / "ssl-tune")
        overrides = [x for o in args.set for x in ("--set", o)]
        proc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-a", ssl_tune, "run", "spec.yaml", "--name", "t",
                               "--address", ray["address"], *overrides], cwd=work, capture_output=True, text=True, env=env,
                              timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the trial failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        (result_file,) = (work / "ssl_tune_runs").glob("t-*/run_trial_*/result.json")
        results = [json.loads(line) for line in result_file.read_text().splitlines()]
    finally:
        netns_cluster.down(PREFIX, cluster_dir)
        sys.path.remove(str(common.REPO / "scripts"))
    epoch_s = [r["time_this_iter_s"] for r in results[1:]]
    return {"epoch_s": statistics.median(epoch_s), "worker_nodes": results[-1]["worker_nodes"],
            "images_per_s": statistics.median(r["images_per_s"] for r in results[1:])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("the cluster benchmark makes network namespaces: run it as root")
    runs: dict[str, list[dict[str, Any]]] = {"one_host": [], "two_hosts": []}
    for repeat in range(args.repeats):
        for layout in ("one_host", "two_hosts") if repeat % 2 == 0 else ("two_hosts", "one_host"):
            with tempfile.TemporaryDirectory(prefix="ssl-tune-bench-cluster-") as tmp:
                runs[layout].append(_one_trial(layout == "two_hosts", args, Path(tmp)))
            print(f"  {layout}: epoch {runs[layout][-1]['epoch_s']:.2f} s on {runs[layout][-1]['worker_nodes']:g} node(s)",
                  flush=True)
    one, two = (statistics.median(r["epoch_s"] for r in runs[k]) for k in ("one_host", "two_hosts"))
    return {"epochs": args.epochs, "batch_size": args.batch_size, "repeats": args.repeats, "overrides": args.set,
            "runs": runs, "two_hosts_over_one_host": two / one}


def report(result: dict[str, Any], figures: str) -> str:
    one = statistics.median(r["epoch_s"] for r in result["runs"]["one_host"])
    rows = ["| layout | nodes the workers ran on | epoch time, relative to one host (median) | each trial |",
            "|---|---|---|---|"]
    for key, name in (("one_host", "one host, 2 CPUs"), ("two_hosts", "two hosts over a veth link, 1 CPU each")):
        epochs = [r["epoch_s"] / one for r in result["runs"][key]]
        nodes = sorted({r["worker_nodes"] for r in result["runs"][key]})
        rows.append(f"| {name} | {', '.join(f'{n:g}' for n in nodes)} | {statistics.median(epochs):.3f} | "
                    f"{', '.join(f'{e:.3f}' for e in epochs)} |")
    return "\n".join(rows) + (f"\n\nTWIST, small CNN (width 16), global batch {result['batch_size']}, {result['epochs']} "
                              f"epochs, {result['repeats']} trial(s) per layout, the layouts alternating"
                              + (f", with {', '.join(result['overrides'])}." if result.get("overrides") else "."))
