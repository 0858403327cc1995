"""Racing the confirmation over seeds: add seeds in rounds, drop configurations that cannot win, stop once
the verdict is decided.

The procedure (after SMAC3's intensification, which races each challenger against the incumbent on a
growing number of seeds). The `K` challengers (the search's best configurations) and the default are
trained on `min_seeds` seeds, then one more seed a round, up to `max_seeds`. After each round (a *look*):

- **The noise model.** Every run's objective is its configuration's mean plus independent noise with one
  SD shared by all configurations. The SD is pooled over every run of the race (one-way ANOVA):
  ``s^2 = sum_c sum_i (x_ci - xbar_c)^2 / (N - C)`` with ``N - C`` degrees of freedom. After the first
  round of 2 challengers and the default on 2 seeds, that is 3 degrees of freedom, where one pair's
  difference would give 1.
- **The gain** of challenger `c` over the default is ``g_c = xbar_c - xbar_D`` (negated when the objective
  is minimised), with standard error ``s * sqrt(1/n_c + 1/n_D)`` and Student's t on ``N - C`` degrees.
- **The claim.** The leader (the challenger with the largest gain) *beats the default* when
  ``g / se > t_{1 - a_l}``. The error level `alpha` (5 %) is split over the K challengers and the planned
  looks (Bonferroni): each interim look spends ``INTERIM_SHARE`` of it, the last look the rest
  (Haybittle-Peto), so ``a_l = alpha * share_l / K``. By the union bound, the chance of any false claim
  over the whole race is at most `alpha` however early the race stops.
- **Leaving the race.** A challenger leaves when it is below the leader, or below the default, beyond
  noise: one-sided at ``ELIMINATION_LEVEL``. Leaving makes no claim, so it cannot add false claims.
- **Stopping.** The race stops when the claim is made; when the leader is below the default at the claim's
  level ("does not beat", decided the other way); when the leader's conditional power, the chance of a
  claim at the last look if its current gain is its true gain, falls below ``FUTILITY_POWER`` (a
  non-binding futility stop: it can only remove claims); or at `max_seeds`, "undecided at N seeds".

With `racing: false` the race has one look, at `max_seeds`, and no one leaves: the fixed-seed
confirmation, with the same test.

`python -m benchmarks racing` measures the error rates and the runs trained, against fixed seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT = "default"  # what a confirmation of the spec's default configuration confirms

INTERIM_SHARE = 0.05  # of the error level, spent at each interim look; the last look gets the rest
ELIMINATION_LEVEL = 0.1  # one-sided: below the leader or the default at this level, a challenger leaves
FUTILITY_POWER = 0.1  # below this conditional power the leader can no longer be shown to beat the default

BEATS, WORSE, FUTILE, UNDECIDED, ONE_LEFT = "beats", "does not beat", "cannot beat in time", "undecided", "one left"


@dataclass(frozen=True)
class RaceRules:
    """How a race runs: `challengers` (K) configurations and, with `default`, the default; `seeds` the
    training seeds in the order they are used (their count is the most any configuration gets)."""

    challengers: int
    seeds: tuple[int, ...]
    min_seeds: int = 2
    racing: bool = True
    default: bool = True
    alpha: float = 0.05
    mode: str = "max"

    @classmethod
    def of_spec(cls, spec: Any, challengers: int) -> RaceRules:
        """The race of `spec`'s `search.confirm`: its seeds are fresh (`training.seed` + 1, + 2, ...), since
        every search trial trained on `training.seed`."""
        confirm = spec.search.confirm
        seeds = tuple(spec.training.seed + i for i in range(1, confirm.seeds + 1))
        return cls(challengers, seeds, min_seeds=confirm.min_seeds, racing=confirm.racing, default=confirm.default,
                   mode=spec.search.mode)

    @property
    def looks(self) -> list[int]:
        """How many seeds each configuration has after each round."""
        top = len(self.seeds)
        return list(range(min(self.min_seeds, top), top + 1)) if self.racing else [top]

    def claim_level(self, look: int) -> float:
        """One challenger's one-sided level at look `look` (0-based): `alpha` split over looks and challengers."""
        looks = len(self.looks)
        interim = min(INTERIM_SHARE, 0.5 / max(looks - 1, 1))  # (many looks: half the level for all interim ones)
        share = interim if look < looks - 1 else 1 - interim * (looks - 1)
        return self.alpha * share / max(self.challengers, 1)


@dataclass(frozen=True)
class Gain:
    """A challenger's gain over the default (positive: better, under the mode), its standard error and
    the pooled degrees of freedom."""

    of: str
    gain: float
    se: float
    dof: int

    def bounds(self, level: float) -> tuple[float, float]:
        """The two-sided interval whose each side is one-sided at `level`."""
        from scipy.stats import t

        half = float(t.ppf(1 - level, self.dof)) * self.se
        return self.gain - half, self.gain + half

    def t(self) -> float:
        return self.gain / self.se if self.se > 0 else math.copysign(math.inf, self.gain)


def pooled_sd(values: Mapping[str, Sequence[float]]) -> tuple[float, int]:
    """The SD pooled over configurations (one-way ANOVA) and its degrees of freedom; NaN, 0 without any."""
    ss = sum((v - statistics.fmean(vs)) ** 2 for vs in values.values() if vs for v in vs)
    dof = sum(len(vs) for vs in values.values()) - sum(1 for vs in values.values() if vs)
    return (math.sqrt(ss / dof), dof) if dof > 0 else (math.nan, 0)


def gains(values: Mapping[str, Sequence[float]], mode: str, against: str = DEFAULT) -> dict[str, Gain]:
    """Each configuration's gain over `against` under the pooled noise model (`values`: finite objectives)."""
    sd, dof = pooled_sd(values)
    base = values.get(against) or []
    if not dof or not base:
        return {}
    sign = 1.0 if mode == "max" else -1.0
    return {of: Gain(of, sign * (statistics.fmean(vs) - statistics.fmean(base)), sd * math.sqrt(1 / len(vs) + 1 / len(base)),
                     dof) for of, vs in values.items() if of != against and vs}


@dataclass
class Race:
    """The state of one race: who is in it, who left (the round and why), the decision. Feed it each round's
    objectives (`observe`); `next_round` says which runs the next round trains."""

    rules: RaceRules
    names: list[str]  # the challengers, in the search's order
    in_race: list[str] = field(default_factory=list)
    left: dict[str, tuple[int, str]] = field(default_factory=dict)
    rounds: int = 0
    decision: str = ""
    final: Gain | None = None  # the leader's gain at the last look

    def __post_init__(self) -> None:
        self.in_race = self.in_race or list(self.names)

    @property
    def done(self) -> bool:
        return bool(self.decision)

    @property
    def level(self) -> float:
        """The one-sided level of the last look's claim test."""
        return self.rules.claim_level(max(self.rounds - 1, 0))

    def next_round(self) -> list[tuple[str, int]]:
        """(configuration, seed) of every run the next round trains: those in the race and the default."""
        if self.done:
            return []
        looks = self.rules.looks
        before = looks[self.rounds - 1] if self.rounds else 0
        names = self.in_race + ([DEFAULT] if self.rules.default else [])
        return [(of, seed) for seed in self.rules.seeds[before:looks[self.rounds]] for of in names]

    def observe(self, objectives: Mapping[str, Mapping[int, float]]) -> None:
        """Decide after a round: `objectives` maps each configuration to {seed: objective} of every run so far
        (a failed run's objective is NaN, and does not count)."""
        look, last = self.rounds, self.rounds == len(self.rules.looks) - 1
        self.rounds += 1
        values = {of: [v for v in by_seed.values() if math.isfinite(v)] for of, by_seed in objectives.items()}
        for of in list(self.in_race):
            if not values.get(of):
                self._leave(of, "no run finished")
        if not self.in_race:
            self.decision = UNDECIDED
            return
        if self.rules.default:
            self._against_default(values, look, last)
        else:
            self._among_challengers(values, last)

    def _leave(self, of: str, why: str) -> None:
        self.in_race.remove(of)
        self.left[of] = (self.rounds, why)

    def _against_default(self, values: Mapping[str, list[float]], look: int, last: bool) -> None:
        from scipy.stats import t

        found = gains(values, self.rules.mode)
        if not found:  # no default run finished, or no degree of freedom yet
            self.decision = UNDECIDED if last else ""
            return
        leader = max(self.in_race, key=lambda of: found[of].gain)
        self.final = found[leader]
        level = self.rules.claim_level(look)
        claim = float(t.ppf(1 - level, self.final.dof))
        if self.final.t() > claim:
            self.decision = BEATS
            return
        self._eliminate(values, leader, found)
        if self.final.t() < -claim:
            self.decision = WORSE
        elif last:
            self.decision = UNDECIDED
        elif self._conditional_power(values, leader) < FUTILITY_POWER:
            self.decision = FUTILE

    def _eliminate(self, values: Mapping[str, list[float]], leader: str, found: Mapping[str, Gain] | None) -> None:
        """Challengers below the leader, or (`found`: their gains over the default) below the default, leave."""
        from scipy.stats import t

        below_leader = gains(values, self.rules.mode, against=leader)
        for of in [of for of in self.in_race if of != leader and of in below_leader]:
            cut = float(t.ppf(1 - ELIMINATION_LEVEL, below_leader[of].dof))
            if -below_leader[of].t() > cut:
                self._leave(of, "below the leader")
            elif found is not None and found[of].t() < -cut:
                self._leave(of, "below the default")

    def _among_challengers(self, values: Mapping[str, list[float]], last: bool) -> None:
        """Without the default: challengers below the leader leave; the race ends with one left."""
        means = {of: statistics.fmean(values[of]) * (1 if self.rules.mode == "max" else -1) for of in self.in_race}
        leader = max(means, key=means.__getitem__)
        self._eliminate(values, leader, None)
        if len(self.in_race) == 1:
            self.decision = ONE_LEFT
        elif last:
            self.decision = UNDECIDED

    def _conditional_power(self, values: Mapping[str, list[float]], leader: str) -> float:
        """The chance of a claim at the last look if the leader's current gain is its true gain."""
        from scipy.stats import t

        g = self.final
        if g is None or not g.se:
            return 1.0
        top = len(self.rules.seeds)
        n = min(len(values[leader]), len(values[DEFAULT]))
        sd = g.se / math.sqrt(1 / len(values[leader]) + 1 / len(values[DEFAULT]))
        if n >= top:
            return 0.0
        claim_last = float(t.ppf(1 - self.rules.claim_level(len(self.rules.looks) - 1), g.dof))
        # The last look's gain: this one's, weighted n / top, plus the future seeds' average difference.
        future_sd = sd * math.sqrt(2 * (top - n)) / top
        return float(1 - t.cdf((claim_last * sd * math.sqrt(2 / top) - g.gain) / future_sd, g.dof))

    def verdict(self) -> str:
        """One line: the decision, the leader's gain with its interval at the race's level, and the seeds."""
        if not self.rules.default:
            return "the default was not confirmed, so the winner is not compared with it"
        g = self.final
        if g is None:
            return "no confirmation run finished" if not self.rounds else "too few runs finished to compare with the default"
        low, high = g.bounds(self.level)
        gain = (f"{g.gain:+.2f} (interval {low:+.2f} to {high:+.2f}; at most {self.rules.alpha:.0%} false claims over "
                "the race)")
        seeds, top = self.rules.looks[self.rounds - 1], len(self.rules.seeds)
        return {BEATS: f"the winner beats the default beyond seed noise after {seeds} of at most {top} seeds: {gain}",
                WORSE: f"the winner does not beat the default: it is below it beyond seed noise after {seeds} seeds: {gain}",
                FUTILE: f"the winner does not beat the default: after {seeds} seeds a gain could no longer be shown by "
                        f"{top} (conditional power below {FUTILITY_POWER:.0%}): {gain}",
                }.get(self.decision, f"undecided at {seeds} seeds: {gain}")


def replay(rules: RaceRules, names: Sequence[str], objectives: Mapping[str, Mapping[int, float]]) -> Race:
    """The race as far as `objectives` (every confirmation run so far, by configuration and seed) take it: each
    round whose runs are all there is observed in turn. The returned race's `next_round` is what is left to train."""
    race = Race(rules, list(names))
    while not race.done:
        needed = race.next_round()
        if not needed or any(seed not in objectives.get(of, {}) for of, seed in needed):
            break
        race.observe({of: {s: v for s, v in by_seed.items() if s in rules.seeds[:rules.looks[race.rounds]]}
                      for of, by_seed in objectives.items()})
    return race
