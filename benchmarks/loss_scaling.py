"""Cost of the losses (forward + backward) as the batch, the feature dimension or the bank grows.

    python -m benchmarks loss-scaling [--part hsic corinfomax isd] [--repeats 3] [--max-exact-gb 10]

- SSL-HSIC, against the batch size: the exact estimators build the n x n kernel matrix
  (n = batch * views), so they cost O(n^2); the random-feature estimators cost O(n F (D + F)).
- CorInfoMax, against the projector dimension D at a fixed batch: two D x D covariance updates,
  O(N D^2), and two float64 Cholesky log-determinants, O(D^3).
- ISD, against the memory-bank size K at a fixed batch: two B x K similarity matrices, O(B K D).

Reported per size: the median seconds after a warm-up (in the JSON), the time relative to the
smallest size measured in the same run, and the exponent p of a least-squares fit time ~ size^p.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

N_BY_N_MATRICES = 8  # SSL-HSIC exact: kernel, distances, centred kernel and their gradients, roughly


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocator and thread pools
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def fitted_exponent(sizes: list[float], times: list[float]) -> float:
    """p of the least-squares fit log time = p log size + c."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def hsic(args: argparse.Namespace) -> dict[str, Any]:
    from trainers.ssl_hsic import hsic_loss, imq_random_features

    g = torch.Generator().manual_seed(0)
    dim, views_count = 128, 4  # 4 views: online predictions and target projections of both views

    def step(views, rff):
        leaves = [v.detach().requires_grad_() for v in views]
        hsic_loss(leaves, gamma=3.0, scale=1.0, rff=rff).loss.backward()

    rows = []
    for batch in args.hsic_batch_sizes:
        views = [F.normalize(torch.randn(batch, dim, generator=g), dim=1) for _ in range(views_count)]
        rff = (*imq_random_features(512, dim, generator=g), *imq_random_features(512, dim, generator=g))
        n = batch * views_count
        row = {"batch": batch, "rff_s": median_seconds(lambda: step(views, rff), args.repeats), "exact_s": None}
        if N_BY_N_MATRICES * n * n * 4 / 1e9 <= args.max_exact_gb:
            row["exact_s"] = median_seconds(lambda: step(views, None), args.repeats)
        rows.append(row)
        print(f"  hsic batch {batch}: random features {row['rff_s']:.4f} s, exact {row['exact_s']} s", flush=True)
    exact = [(r["batch"], r["exact_s"]) for r in rows if r["exact_s"]]
    return {"views": views_count, "dim": dim, "features": 512, "rows": rows,
            "exponent_rff": fitted_exponent([r["batch"] for r in rows], [r["rff_s"] for r in rows]),
            "exponent_exact": fitted_exponent(*map(list, zip(*exact))) if len(exact) > 1 else None}


def corinfomax(args: argparse.Namespace) -> dict[str, Any]:
    from trainers.corinfomax import CorInfoMaxLoss

    g = torch.Generator().manual_seed(0)
    batch, rows = 256, []
    for dim in args.corinfomax_dims:
        loss = CorInfoMaxLoss(dim, alpha=500.0, eps=1e-5, la_R=0.01, la_mu=0.01)
        z1, z2 = (F.normalize(torch.randn(batch, dim, generator=g), dim=1) for _ in range(2))

        def step():
            a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
            loss(a, b).loss.backward()

        rows.append({"dim": dim, "seconds": median_seconds(step, args.repeats)})
        print(f"  corinfomax D {dim}: {rows[-1]['seconds']:.4f} s", flush=True)
    return {"batch": batch, "rows": rows,
            "exponent": fitted_exponent([r["dim"] for r in rows], [r["seconds"] for r in rows])}


def isd(args: argparse.Namespace) -> dict[str, Any]:
    from trainers.isd import isd_loss

    g = torch.Generator().manual_seed(0)
    batch, dim, rows = 256, 128, []
    student, teacher = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    for bank_size in args.isd_bank_sizes:
        bank = F.normalize(torch.randn(bank_size, dim, generator=g), dim=1)

        def step():
            isd_loss(student.detach().requires_grad_(), teacher, bank, t_student=0.2, t_teacher=0.1).loss.backward()

        rows.append({"bank_size": bank_size, "seconds": median_seconds(step, args.repeats)})
        print(f"  isd K {bank_size}: {rows[-1]['seconds']:.4f} s", flush=True)
    return {"batch": batch, "dim": dim, "rows": rows,
            "exponent": fitted_exponent([r["bank_size"] for r in rows], [r["seconds"] for r in rows])}


PARTS = {"hsic": hsic, "corinfomax": corinfomax, "isd": isd}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hsic-batch-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--max-exact-gb", type=float, default=10.0, help="skip exact HSIC beyond this memory")
    parser.add_argument("--corinfomax-dims", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--isd-bank-sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {"threads": torch.get_num_threads(), **{part: PARTS[part](args) for part in args.part}}


def _relative_table(title: str, part: dict[str, Any], key: str, symbol: str) -> list[str]:
    """Time against one size, relative to the smallest, and the fitted exponent."""
    base = part["rows"][0]
    return [f"{title}: time relative to {symbol} = {base[key]}.", "", f"| {symbol} | relative time |", "|---:|---:|",
            *(f"| {r[key]} | {r['seconds'] / base['seconds']:.1f} |" for r in part["rows"]),
            "", f"Fitted exponent p (time ~ {symbol}^p): {part['exponent']:.2f}.", ""]


def report(result: dict[str, Any], figures: str) -> str:
    out = []
    if "hsic" in result:
        h = result["hsic"]
        rows = h["rows"]
        rff0 = rows[0]["rff_s"]
        out += [f"**SSL-HSIC** ({h['views']} views, D = {h['dim']}, {h['features']} random features): time relative "
                "to the random-feature loss at the smallest batch, and exact / random features.", "",
                "| batch | random features | exact | exact / random features |", "|---:|---:|---:|---:|"]
        for r in rows:
            exact = f"{r['exact_s'] / rff0:.1f}" if r["exact_s"] else "skipped (memory)"
            ratio = f"{r['exact_s'] / r['rff_s']:.1f}" if r["exact_s"] else "-"
            out.append(f"| {r['batch']} | {r['rff_s'] / rff0:.1f} | {exact} | {ratio} |")
        exact_p = f"{h['exponent_exact']:.2f}" if h["exponent_exact"] is not None else "-"
        out += ["", f"Fitted exponent p (time ~ batch^p): random features {h['exponent_rff']:.2f}, exact {exact_p}.", ""]
    if "corinfomax" in result:
        c = result["corinfomax"]
        out += _relative_table(f"**CorInfoMax** (batch {c['batch']})", c, "dim", "D")
    if "isd" in result:
        i = result["isd"]
        out += _relative_table(f"**ISD** (batch {i['batch']}, D = {i['dim']})", i, "bank_size", "K")
    return "\n".join(out).rstrip()
