"""Cost of the SSL-HSIC loss (forward + backward) against the batch size: exact vs random features.

    python -m benchmarks.hsic_scaling [--batch-sizes 256 512 ... 8192] [--views 4] [--dim 128]
                                      [--features 512] [--max-exact-gb 10] [--json FILE]

The exact estimators build the n x n kernel matrix (n = batch * views), so their cost grows with
n^2; the random-feature estimators cost O(n * F * (D + F)), linear in the batch. Reported per batch
size: the median seconds of each (after a warm-up) and their ratio, then the exponent p of a
least-squares fit time ~ batch^p for each estimator. The exact loss is skipped where its kernel
matrices would exceed --max-exact-gb (a handful of n x n float32 matrices live at once).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from trainers.ssl_hsic import hsic_loss, imq_random_features

N_BY_N_MATRICES = 8  # kernel, distances, centred kernel and their gradients, roughly


def seconds(views: list[torch.Tensor], rff, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocator and thread pools
        leaves = [v.detach().requires_grad_() for v in views]
        start = time.perf_counter()
        hsic_loss(leaves, gamma=3.0, scale=1.0, rff=rff).loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def fitted_exponent(sizes: list[int], times: list[float]) -> float:
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--views", type=int, default=4, help="k: 4 with the target network, 2 without")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-exact-gb", type=float, default=10.0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch_sizes:
        views = [F.normalize(torch.randn(batch, args.dim, generator=g), dim=1) for _ in range(args.views)]
        rff = (*imq_random_features(args.features, args.dim, generator=g), *imq_random_features(args.features, args.dim, generator=g))
        n = batch * args.views
        exact_gb = N_BY_N_MATRICES * n * n * 4 / 1e9
        row = {"batch": batch, "n": n, "rff_s": seconds(views, rff, args.repeats), "exact_s": None}
        if exact_gb <= args.max_exact_gb:
            row["exact_s"] = seconds(views, None, args.repeats)
        rows.append(row)
        exact = f"{row['exact_s']:.4f} s" if row["exact_s"] else f"skipped (~{exact_gb:.0f} GB)"
        ratio = f"{row['exact_s'] / row['rff_s']:.1f}" if row["exact_s"] else "-"
        print(f"batch {batch:5d}  n {n:6d}  random features {row['rff_s']:.4f} s  exact {exact}  exact/rff {ratio}", flush=True)

    exponents = {}
    for key in ("rff_s", "exact_s"):
        measured = [(r["batch"], r[key]) for r in rows if r[key]]
        if len(measured) >= 2:
            exponents[key[:-2]] = fitted_exponent(*map(list, zip(*measured)))
            upper = [(b, t) for b, t in measured if b >= 1024]
            if len(upper) >= 2:
                exponents[key[:-2] + "_from_1024"] = fitted_exponent(*map(list, zip(*upper)))
    print("fitted exponent p in time ~ batch^p: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows, "exponents": exponents}, f, indent=2)


if __name__ == "__main__":
    main()
