"""The confirmation stage: the search's best configurations and the spec's default, re-trained on fresh seeds.

A search ranks single training runs, and on small data the gaps between good configurations are
about as large as one run's seed noise; the top of a leaderboard is partly luck. After the search,
the `search.confirm.top_k` best configurations and the default are trained again at the full budget on
fresh training seeds, the same seeds for every configuration, raced in rounds (`ssl_tune.searching.racing`):
each configuration gets a mean with a 95% interval, and the winner's gain over the default a verdict at
the race's error level.

This module is the arithmetic: which configurations to confirm, and the table. The runs are ordinary
Tune trials, a Tuner a round (`ssl_tune.searching.driver`), and their MLflow record is in `ssl_tune.tracking`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ssl_tune.searching.racing import DEFAULT, Race, gains
from ssl_tune.searching.space import best_trial, counts, ranked
from ssl_tune.spec import SpecBase, range_default


def confirmation_points(spec: SpecBase, rows: Sequence[dict[str, Any]],
                        configs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The configurations the confirmation races, as (what it confirms, field values): the `top_k` best trials
    by the one rule (`space.best_trial`, applied repeatedly), then the default.

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
    return points


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


def summarise(objectives: Mapping[str, Mapping[int, float]], race: Race) -> list[dict[str, Any]]:
    """One row per confirmed configuration, best mean first: its interval over its own seeds; when the default
    was confirmed, the gain over the default (positive: better, under the mode) under the race's pooled noise
    model, with its interval at the race's last level, and whether the race claimed it beats the default; and
    the round a configuration left the race in, and why ("" for one that stayed).

    `objectives` maps what a configuration confirms (a search trial's run id, or `DEFAULT`) to {seed: objective};
    a failed seed's objective is NaN, and does not count.
    """
    finite = {of: [v for v in by_seed.values() if counts(v)] for of, by_seed in objectives.items()}
    found = gains(finite, race.rules.mode) if race.rules.default else {}
    rows = []
    for of, values in finite.items():
        interval = Interval.of(values)
        row: dict[str, Any] = {"confirms": of, "seeds": interval.n, "mean": interval.mean, "sd": interval.sd,
                               "ci95_low": interval.low, "ci95_high": interval.high}
        if of in found:
            low, high = found[of].bounds(race.level)
            row.update({"gain_over_default": found[of].gain, "gain_low": low, "gain_high": high,
                        "beats_default": race.decision == "beats" and race.final is not None and race.final.of == of})
        if of != DEFAULT:
            left = race.left.get(of)
            row["left_race"] = f"round {left[0]}: {left[1]}" if left else ""
        rows.append({"objective": interval.mean, **row})
    return ranked(rows, race.rules.mode)


def winner(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The confirmed winner: the configuration with the best mean (`summarise` ranks them)."""
    return next((r for r in rows if counts(r["mean"])), None)


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
