"""The racing confirmation against fixed seeds, simulated on the measured seed noise.

    python -m benchmarks racing [--simulations 2000]     # about 2 min on 2 cores

Each simulated confirmation draws every run's objective from the noise model measured by `python -m
benchmarks noise` (docs/benchmarks/noise.json): its configuration's mean plus Gaussian noise with the pooled
seed-to-seed SD. The K challengers and the default of the shipped TWIST spec's confirmation
(`search.confirm`) are raced by the product's own `ssl_tune.searching.racing.Race`. Cases:

- **null**: every challenger's mean is the default's (the mean of the measured configurations);
- **1 SD, 2 SD**: one challenger is 1 or 2 noise SDs better than the default, the others equal to it.

For racing and for fixed 3 and 6 seeds (`search.confirm.racing: false`, the same test at one look) it
reports the runs trained, the false "beats the default" rate (null) and the rate at which the better
challenger is found to beat the default. A row also shows the test before racing: each challenger's
paired Student-t interval over 3 seeds at 95 %, uncorrected for picking the best of K.

**The compute comparison.** The fixed-seed confirmation with the same false-positive rate and the same
power for a 2-SD gain as racing: for each seed count n, the fixed confirmation's claim threshold is set so
that its simulated null rate equals racing's, its power for a 2-SD gain is simulated, and n is interpolated
where that power equals racing's. Racing's runs, averaged over the three cases, are divided by that
confirmation's (K + 1) n runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from typing import Any

from benchmarks import common

SPEC = common.REPO / "search_spaces" / "twist.yaml"
NOISE = common.RESULTS / "noise.json"
CASES = {"null": 0.0, "1 SD": 1.0, "2 SD": 2.0}
FIXED = (3, 6)


def rules_of_spec(**changes: Any):
    """The race the shipped spec runs (`RaceRules.of_spec`), with `changes`."""
    from dataclasses import replace

    from ssl_tune.searching.racing import RaceRules
    from ssl_tune.spec.files import load_spec

    spec = load_spec(SPEC)
    return replace(RaceRules.of_spec(spec, spec.search.confirm.top_k), **changes)


def simulate(rules, gain_sd: float, sd: float, base: float, rng: random.Random) -> tuple[int, bool, float]:
    """One raced confirmation: (runs trained, whether the better challenger, or under the null any, was claimed
    to beat the default, the leader's one-sided p-value at the last look)."""
    from scipy.stats import t

    from ssl_tune.searching.racing import BEATS, DEFAULT, Race

    names = [f"c{i}" for i in range(rules.challengers)]
    means = {of: base for of in names} | {DEFAULT: base, names[0]: base + gain_sd * sd}
    objectives: dict[str, dict[int, float]] = {of: {} for of in [*names, DEFAULT]}
    race, runs = Race(rules, names), 0
    while not race.done:
        for of, seed in race.next_round():
            objectives[of][seed] = rng.gauss(means[of], sd)
            runs += 1
        race.observe(objectives)
    leader = race.final
    claimed = race.decision == BEATS and (gain_sd == 0 or (leader is not None and leader.of == names[0]))
    p = float(1 - t.cdf(leader.t(), leader.dof)) if leader is not None else 1.0
    return runs, claimed, p if leader is not None and (gain_sd == 0 or leader.of == names[0]) else 1.0


def paired_before(k: int, seeds: int, gain_sd: float, sd: float, rng: random.Random) -> bool:
    """The test before racing: the best mean's paired Student-t 95 % interval over `seeds` excludes zero."""
    from scipy.stats import t

    runs = [[rng.gauss(gain_sd * sd if c == 0 else 0.0, sd) for _ in range(seeds)] for c in range(k + 1)]
    default = runs[k]
    best = max(range(k), key=lambda c: statistics.fmean(runs[c]))
    diffs = [a - b for a, b in zip(runs[best], default)]
    half = float(t.ppf(0.975, seeds - 1)) * statistics.stdev(diffs) / math.sqrt(seeds)
    return statistics.fmean(diffs) - half > 0 and (gain_sd == 0 or best == 0)


def matched_fixed(rules, sd: float, base: float, false_rate: float, power: float, n_sims: int, rng: random.Random) -> float:
    """The seed count of the fixed confirmation with racing's false-positive rate and 2-SD power (interpolated)."""
    from dataclasses import replace

    powers = {}
    for n in range(2, 13):
        fixed = replace(rules, racing=False, seeds=tuple(range(1, n + 1)))
        null = sorted(simulate(fixed, 0.0, sd, base, rng)[2] for _ in range(n_sims))
        threshold = null[max(int(false_rate * n_sims) - 1, 0)]  # the claim threshold giving racing's null rate
        powers[n] = statistics.fmean(simulate(fixed, 2.0, sd, base, rng)[2] <= threshold for _ in range(n_sims))
        if powers[n] >= power:
            below = powers.get(n - 1, 0.0)
            return n - 1 + (power - below) / (powers[n] - below) if n > 2 else float(n)
    return math.inf


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--simulations", type=int, default=2000, help="simulated confirmations per case and design")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    noise = json.loads(NOISE.read_text())
    sd, base = noise["noise_floor_sd"], statistics.fmean(p["knn_mean"] for p in noise["points"])
    rng, rules = random.Random(args.seed), rules_of_spec()
    designs = {"racing": rules, **{f"fixed {n} seeds": replace(rules, racing=False, seeds=rules.seeds[:n]) for n in FIXED}}
    result: dict[str, Any] = {"noise_sd": sd, "challengers": rules.challengers, "min_seeds": rules.min_seeds,
                              "max_seeds": len(rules.seeds), "alpha": rules.alpha, "simulations": args.simulations,
                              "designs": {}}
    for name, design in designs.items():
        rows = {case: [simulate(design, g, sd, base, rng)[:2] for _ in range(args.simulations)] for case, g in CASES.items()}
        result["designs"][name] = {case: {"runs": statistics.fmean(r for r, _ in sims),
                                          "claims": statistics.fmean(c for _, c in sims)} for case, sims in rows.items()}
        print(f"  {name}: {result['designs'][name]}", flush=True)
    result["designs"]["fixed 3 seeds, paired t per configuration (before racing)"] = {
        case: {"runs": (rules.challengers + 1) * 3,
               "claims": statistics.fmean(paired_before(rules.challengers, 3, g, sd, rng) for _ in range(args.simulations))}
        for case, g in CASES.items()}
    race = result["designs"]["racing"]
    n_star = matched_fixed(rules, sd, base, race["null"]["claims"], race["2 SD"]["claims"], args.simulations, rng)
    mean_runs = statistics.fmean(race[case]["runs"] for case in CASES)
    result.update(matched_seeds=n_star, matched_runs=(rules.challengers + 1) * n_star,
                  racing_mean_runs=mean_runs, racing_share=mean_runs / ((rules.challengers + 1) * n_star))
    print(f"  matched fixed confirmation: {n_star:.2f} seeds; racing trains {result['racing_share']:.2f} of its runs")
    return result


def report(result: dict[str, Any], figures: str) -> str:
    lines = [f"{result['challengers']} challengers and the default; racing from {result['min_seeds']} to "
             f"{result['max_seeds']} seeds at a {result['alpha']:.0%} false-claim level; noise SD "
             f"{result['noise_sd']:.2f} (the measured noise floor); {result['simulations']} simulated confirmations "
             "per case and design.", "",
             "| design | runs: null | 1 SD | 2 SD | false \"beats the default\" (null) | finds a 1-SD gain "
             "| finds a 2-SD gain |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, d in result["designs"].items():
        lines.append(f"| {name} | {d['null']['runs']:.1f} | {d['1 SD']['runs']:.1f} | {d['2 SD']['runs']:.1f} | "
                     f"{d['null']['claims']:.1%} | {d['1 SD']['claims']:.1%} | {d['2 SD']['claims']:.1%} |")
    lines += ["", f"The fixed-seed confirmation with racing's false-positive rate and 2-SD power needs "
                  f"{result['matched_seeds']:.2f} seeds, {result['matched_runs']:.1f} runs; racing trains "
                  f"{result['racing_mean_runs']:.1f} on average over the three cases: **{result['racing_share']:.2f}** "
                  "of them."]
    return "\n".join(lines)
