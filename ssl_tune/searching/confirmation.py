"""The confirmation stage: the search's best configurations and the spec's default, re-trained on fresh seeds.

A search ranks single training runs, and on small data the gaps between good configurations are
about as large as one run's seed noise; the top of a leaderboard is partly luck. After the search,
the `search.confirm.top_k` best configurations and the default are trained again at the full budget
on `search.confirm.seeds` fresh training seeds, the same seeds for every configuration, so that
each configuration gets a mean with a 95% interval and its difference to the default is *paired*
by seed (what varies with the seed, the data order and initialisation, cancels out of the difference).

This module is the arithmetic: which trials to confirm, and the intervals. The runs are ordinary
Tune trials (`ssl_tune.searching.driver`), and their MLflow record is in `ssl_tune.tracking`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssl_tune.searching.space import CONFIRMATION_KEY, best_trial, counts, ranked
from ssl_tune.spec import SpecBase, range_default

DEFAULT = "default"  # what a confirmation of the spec's default configuration confirms


def confirmation_seeds(spec: SpecBase) -> list[int]:
    """Fresh training seeds: the search's trials all trained on `training.seed`."""
    return [spec.training.seed + i for i in range(1, spec.search.confirm.seeds + 1)]


def confirmation_configs(spec: SpecBase, rows: Sequence[dict[str, Any]],
                         configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The Tune configs of the confirmation trials: the `top_k` best trials by the one rule
    (`space.best_trial`, applied repeatedly) and the default, each once per seed.

    `rows` is the leaderboard (with "trial_id", "run_id", "objective", "status"); `configs` maps a
    search trial's id to its field values (`space.field_values` of its Tune config).
    """
    confirm = spec.search.confirm
    chosen: list[dict[str, Any]] = []
    left = list(rows)
    while len(chosen) < confirm.top_k:
        best = best_trial(left, spec.search.mode)
        if best is None:
            break
        chosen.append(best)
        left = [r for r in left if r is not best]
    points = [(row["run_id"], configs[row["trial_id"]]) for row in chosen if row["trial_id"] in configs]
    if confirm.default:  # its values written out, so that the console and the runs show them
        points.append((DEFAULT, {path: range_default(r) for path, r in spec.search_ranges().items()}))
    return [{CONFIRMATION_KEY: {"of": of, "values": values, "seed": seed}}
            for of, values in points for seed in confirmation_seeds(spec)]


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its sample standard deviation and Student-t 95% interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        from scipy.stats import t

        n = len(values)
        if n == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        mean = statistics.fmean(values)
        if n == 1:
            return cls(1, mean, math.nan, math.nan, math.nan)
        sd = statistics.stdev(values)
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        return cls(n, mean, sd, mean - half, mean + half)

    def excludes_zero(self) -> bool:
        return counts(self.low) and (self.low > 0 or self.high < 0)


def summarise(objectives: dict[str, dict[int, float]], mode: str) -> list[dict[str, Any]]:
    """One row per confirmed configuration, best mean first: its interval over seeds and, when the
    default was confirmed, the paired difference to the default (positive: better, under `mode`)
    and whether that difference's 95% interval excludes zero.

    `objectives` maps what a configuration confirms (a search trial's run id, or `DEFAULT`) to
    {seed: objective}; seeds whose run failed are absent (a NaN objective does not count).
    """
    sign = 1.0 if mode == "max" else -1.0
    default = {s: v for s, v in objectives.get(DEFAULT, {}).items() if counts(v)}
    rows = []
    for of, by_seed in objectives.items():
        values = {s: v for s, v in by_seed.items() if counts(v)}
        interval = Interval.of(list(values.values()))
        row: dict[str, Any] = {"confirms": of, "seeds": interval.n, "mean": interval.mean, "sd": interval.sd,
                               "ci95_low": interval.low, "ci95_high": interval.high}
        if default and of != DEFAULT:
            paired = [sign * (values[s] - default[s]) for s in values if s in default]
            gain = Interval.of(paired)
            row.update({"gain_over_default": gain.mean, "gain_ci95_low": gain.low, "gain_ci95_high": gain.high,
                        "beats_default": gain.excludes_zero() and gain.mean > 0})
        rows.append({"objective": interval.mean, **row})
    return ranked(rows, mode)


def winner(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The confirmed winner: the configuration with the best mean (`summarise` ranks them)."""
    return next((r for r in rows if counts(r["mean"])), None)


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """One line on whether the winner beats the default beyond seed noise."""
    best = winner(rows)
    if best is None:
        return "no confirmation run finished"
    if best["confirms"] == DEFAULT:
        return "the default configuration has the best mean: the search found nothing better"
    if "gain_over_default" not in best:
        return "the default was not confirmed, so the winner is not compared with it"
    interval = f"{best['gain_over_default']:+.2f} (95% interval {best['gain_ci95_low']:+.2f} to {best['gain_ci95_high']:+.2f})"
    if best["beats_default"]:
        return f"the winner beats the default beyond seed noise: {interval} over {best['seeds']} paired seeds"
    return f"the winner does not beat the default beyond seed noise: {interval} over {best['seeds']} paired seeds"


# Fewer configurations than this give no rank correlation worth reading.
RANK_TRANSFER_MIN = 3


def rank_transfer(rows: Sequence[dict[str, Any]]) -> tuple[float, int] | None:
    """Spearman's rank correlation between the confirmed configurations' search scores ("search_objective":
    their single run in the search) and their confirmed means, with how many configurations it is over;
    None for fewer than `RANK_TRANSFER_MIN` with both, or when either is constant.

    After a search at a cheap proxy (`search.confirm.overrides`), it says whether the proxy ranks
    configurations as the full setting does: near 1, the proxy's order holds and its search can be
    trusted to pick; near 0 or below, the proxy's winner was luck or the proxy measures something else.
    """
    from scipy.stats import spearmanr

    pairs = [(r["search_objective"], r["mean"]) for r in rows
             if counts(r.get("search_objective")) and counts(r.get("mean"))]
    if len(pairs) < RANK_TRANSFER_MIN or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    rho = float(spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)
    return (rho, len(pairs)) if not math.isnan(rho) else None


def rank_transfer_line(found: tuple[float, int] | None) -> str:
    """One line on the rank transfer (`rank_transfer`); "" when there is none."""
    if found is None:
        return ""
    rho, n = found
    if rho >= 1 - 1e-9:
        return f"rank transfer: Spearman {rho:+.2f} over {n} configurations: the confirmation kept the search's order"
    return (f"rank transfer: Spearman {rho:+.2f} over {n} configurations: the confirmation did not keep the search's "
            "order, so the search's setting ranks these configurations differently from the confirmation's")
