"""How much training a search asks for: its trials, and the epochs they are expected to run.

Under ASHA a trial runs to the first rung (`grace_period`), and at each rung (``grace_period x
reduction_factor^k`` epochs, below ``training.epochs``) goes on only if it ranks in the best
``1 / reduction_factor`` of the trials that reached that rung. A search of 16 trials of 8 epochs
with rungs at 2 and 6 (one warm-up epoch, reduction factor 3) is then expected to train about
16 x (2 + 4/3 + 2/9) = 57 epochs, not the 128 of every trial at the full budget. ASHA decides asynchronously, so early trials
are promoted more often than the ratio says; `expected_epochs_left` therefore takes the promotion
rates measured so far where they exist (`promotion_rates`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ssl_tune.spec import SpecBase

# Weight of the ratio 1 / reduction_factor against the promotions observed at a rung, in trials.
PRIOR_TRIALS = 2.0


def grace_period(spec: SpecBase) -> int:
    """Epochs before ASHA's first decision: `search.grace_period`, else the warm-up's epochs plus one (with a
    searched warm-up, its longest), so that no trial is cut while its learning rate still ramps up, on
    the noisiest signal of its run; at most `training.epochs`."""
    from ssl_tune.spec.ranges import Choice

    epochs, given = spec.training.epochs, spec.search.grace_period
    if given is not None:
        return min(given, epochs)
    warmup = spec.optimizer.warmup_epochs
    if isinstance(warmup, Choice):
        warmup = max(float(v) for v in warmup.values)
    elif not isinstance(warmup, (int, float)):  # a uniform or log-uniform range
        warmup = warmup.high
    return min(epochs, max(1, math.ceil(float(warmup) + 1)))


def rungs(spec: SpecBase) -> list[int]:
    """The epochs at which ASHA may stop a trial (none without early stopping)."""
    s, epochs = spec.search, spec.training.epochs
    if s.scheduler == "none":
        return []
    every = spec.evaluation.eval_every
    found, milestone = [], float(grace_period(spec))
    while milestone < epochs:  # Ray's ASHA: grace_period * reduction_factor ** k, below max_t
        # A trial reports whole epochs, and the objective only at evaluated ones (every `eval_every`-th
        # and the last): ASHA skips results without it, so it decides at the first evaluated epoch past
        # the milestone.
        found.append(min(epochs, math.ceil(math.ceil(milestone - 1e-9) / every) * every))
        milestone *= s.reduction_factor
    return sorted(set(found))


def confirmation_trials(spec: SpecBase) -> int:
    """Trials of the confirmation stage (every one at the full budget): the `top_k` best
    configurations and the default, once per seed; with racing, the most it trains."""
    c = spec.search.confirm
    if not c.top_k:
        return 0
    return (min(c.top_k, spec.search.num_samples) + int(c.default)) * c.seeds


def confirmation_epochs(spec: SpecBase) -> int:
    """Epochs of the confirmation stage, at the setting `search.confirm.overrides` gives it."""
    return confirmation_trials(spec) * spec.confirmation_spec().training.epochs


def confirmation_cost(spec: SpecBase, data: Any = None) -> float:
    """`confirmation_epochs` counted in epochs of the search's setting, for the ETA the console shows during
    the search: an epoch on all the images at 224 px costs 12 of a proxy's on a quarter of them at 128 px
    (images x pixels; the backbone is taken as the same). `data`: the search's `CacheInfo`, None for the
    bundled data set."""
    from ssl_tune.data.datasets import load_bundled, subset_size

    images = data.manifest["splits"]["train"]["shape"][0] if data is not None else len(load_bundled().ssl_images)

    def cost(s: SpecBase) -> float:
        return subset_size(s.data.subset, images) * (s.data.image_size or 1) ** 2

    return confirmation_epochs(spec) * cost(spec.confirmation_spec()) / cost(spec)


def promotion_rates(spec: SpecBase, reached: Mapping[str, int], ended: set[str]) -> list[float]:
    """Per rung, the expected fraction of trials that reach it and go on: the ratio 1 / reduction_factor,
    moved towards what happened at that rung (`reached`: each trial's last epoch; `ended`: the trials
    that no longer run, whose last epoch is where they stopped)."""
    prior = 1 / spec.search.reduction_factor
    rates = []
    for rung in rungs(spec):
        went_on = sum(epoch > rung for epoch in reached.values())
        stopped = sum(epoch == rung for trial, epoch in reached.items() if trial in ended)
        rates.append((went_on + PRIOR_TRIALS * prior) / (went_on + stopped + PRIOR_TRIALS))
    return rates


def expected_epochs_left(spec: SpecBase, done: int, rates: Sequence[float] | None = None) -> float:
    """Epochs a trial that has run `done` epochs is expected to train still, given the promotion rate
    at each rung (default: 1 / reduction_factor)."""
    stops = rungs(spec)
    rates = list(rates) if rates is not None else [1 / spec.search.reduction_factor] * len(stops)
    left, survive, previous = 0.0, 1.0, done
    for milestone, rate in [*zip(stops, rates), (spec.training.epochs, 0.0)]:
        if milestone <= done:
            continue
        left += survive * (milestone - previous)
        previous, survive = milestone, survive * rate
    return left
