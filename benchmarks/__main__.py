"""python -m benchmarks NAME [options]: run one benchmark, save its JSON, rewrite docs/benchmarks.md.

    python -m benchmarks throughput          # trainer vs bare loop per method, data share (any device)
    python -m benchmarks gpu-throughput      # ResNet-18, CIFAR-sized inputs, bf16: images/s, % of peak
    python -m benchmarks gpu-check           # ResNet-50 at 96 and 160 px, bf16, streamed vs resident (GPU)
    python -m benchmarks search-overhead     # ssl-tune run vs bare trainer calls, 1 and 2 workers
    python -m benchmarks efficiency-table    # trains the grid the efficiency benchmark replays
    python -m benchmarks efficiency          # TPE + ASHA vs random vs TPE alone vs GP, CMA-ES, QMC, same compute
    python -m benchmarks proxy               # search at a proxy, confirm at full scale, against the full pipeline
    python -m benchmarks warm-start          # a search warm-started from an earlier one against a cold one
    python -m benchmarks racing              # the racing confirmation against fixed seeds, simulated on measured noise
    python -m benchmarks noise               # seed noise of one configuration; RankMe vs kNN top-1
    python -m benchmarks label-free          # RankMe vs kNN top-1 over each method's search trials
    python -m benchmarks knn-bank            # a subset kNN bank against the whole training split, a search's trials
    python -m benchmarks backbones           # kNN top-1 of ViT-tiny against small_cnn, per method (CPU: hours)
    python -m benchmarks loss-scaling        # SSL-HSIC exact vs random features, CorInfoMax D, ISD K
    python -m benchmarks data                # the decoded data cache vs decoding an ImageFolder, 100k JPEGs
    python -m benchmarks cluster             # a 2-worker trial on two hosts (network namespaces) vs one; root
    python -m benchmarks report              # only rewrite docs/benchmarks.md from the saved JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from benchmarks import (backbones, cluster, common, data, gpu_check, knn_bank, label_free, loss_scaling, noise,
                        proxy_search, racing, report, search_efficiency, search_overhead, throughput)

BENCHMARKS = {  # name -> (add_arguments, run)
    "throughput": (throughput.add_arguments, throughput.run),
    "gpu-throughput": (throughput.add_gpu_arguments, throughput.run_gpu),
    "gpu-check": (gpu_check.add_arguments, gpu_check.run),
    "search-overhead": (search_overhead.add_arguments, search_overhead.run),
    "efficiency-table": (lambda p: search_efficiency.add_arguments(p, table=True), search_efficiency.run_table),
    "efficiency": (lambda p: search_efficiency.add_arguments(p, table=False), search_efficiency.run),
    "proxy": (proxy_search.add_proxy_arguments, proxy_search.run_proxy_args),
    "warm-start": (proxy_search.add_warm_start_arguments, proxy_search.run_warm_start),
    "racing": (racing.add_arguments, racing.run),
    "noise": (noise.add_arguments, noise.run),
    "label-free": (label_free.add_arguments, label_free.run),
    "knn-bank": (knn_bank.add_arguments, knn_bank.run),
    "backbones": (backbones.add_arguments, backbones.run),
    "loss-scaling": (loss_scaling.add_arguments, loss_scaling.run),
    "data": (data.add_arguments, data.run),
    "cluster": (cluster.add_arguments, cluster.run),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="where the JSON results and figures go")
    parser.add_argument("--report", type=Path, default=common.REPORT, help="the Markdown page to rewrite")
    commands = parser.add_subparsers(dest="name", required=True)
    for name, (add_arguments, _) in BENCHMARKS.items():
        add_arguments(commands.add_parser(name))
    commands.add_parser("report")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.name != "report":
        result = BENCHMARKS[args.name][1](args)
        result["command"] = shlex.join(["python", "-m", "benchmarks", *argv])
        result["date"] = datetime.date.today().isoformat()
        result["machine"] = common.machine()
        (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    args.report.write_text(report.render(args.results, args.report))
    print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
