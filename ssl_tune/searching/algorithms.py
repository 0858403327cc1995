"""The search algorithm and scheduler of a search: Optuna's sampler through Ray Tune's OptunaSearch, and ASHA."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from ssl_tune.searching import budget
from ssl_tune.searching.space import SearchSpace, field_values, optuna_names
from ssl_tune.spec import SpecBase

if TYPE_CHECKING:
    from ssl_tune.searching.warm_start import WarmStart


def startup_trials(spec: SpecBase) -> int:
    """Trials a model-based sampler (tpe, gp, cmaes) samples at random before modelling:
    `search.startup_trials`, else 2 per searched parameter, at most Optuna's default of 10. Warm-start
    observations (`ssl_tune.searching.warm_start`) are trials of the study, so they count towards it.

    With Optuna's 10, a search of 8 trials (the shipped specs) never leaves random sampling. On the
    search-efficiency benchmark (docs/benchmarks.md, 2 parameters), TPE alone needed 0.95 of random
    search's compute to reach random search's result, TPE + ASHA 0.54; with 2 per parameter, 0.67 and 0.49.
    """
    return spec.search.startup_trials or min(10, 2 * len(spec.searchable_paths()))


def build_sampler(spec: SpecBase):
    """`search.sampler` as Optuna's own sampler, seeded by `search.seed`.

    gp and cmaes model numeric parameters only; a choice (`type: choice`) is sampled independently at
    random by them, as Optuna does. qmc spreads its points as a scrambled Sobol sequence.
    """
    import optuna
    import optuna.samplers as samplers

    s, startup = spec.search, startup_trials(spec)
    if s.sampler == "tpe":
        return samplers.TPESampler(seed=s.seed, n_startup_trials=startup)
    if s.sampler == "gp":
        return samplers.GPSampler(seed=s.seed, n_startup_trials=startup, warn_independent_sampling=False)
    if s.sampler == "cmaes":
        return samplers.CmaEsSampler(seed=s.seed, n_startup_trials=startup, warn_independent_sampling=False)
    if s.sampler == "qmc":
        with warnings.catch_warnings():  # Optuna marks it experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return samplers.QMCSampler(seed=s.seed, scramble=True, warn_independent_sampling=False,
                                       warn_asynchronous_seeding=False)
    return samplers.RandomSampler(seed=s.seed)


class EvaluatedOptunaSearch(OptunaSearch):
    """OptunaSearch that passes over the epochs between evaluations (`evaluation.eval_every`), whose
    results carry no objective (Ray's would fail on them)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


# The Optuna study's name in its in-memory storage, which holds warm-start observations before the search.
STUDY_NAME = "ssl-tune"


def build_search_algorithm(spec: SpecBase, max_concurrent: int, warm: WarmStart | None = None):
    """OptunaSearch with the spec's seeded sampler, limited to `max_concurrent` open trials.

    `warm` (`ssl_tune.searching.warm_start.gather`): earlier trials of the same setting, added to the study as
    completed trials before the first new one, and earlier searches' best configurations, tried first
    after `search.points_to_evaluate`.

    Trials stopped early by ASHA reach Optuna as completed with their last (low-fidelity) value:
    ASHA stops a trial only when it ranks low among trials at the same epoch, so the lower value
    is a fair signal for the sampler that the region is worse.
    """
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    s = spec.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                direction="maximize" if s.mode == "max" else "minimize")
    for observation in warm.observations if warm else []:
        study.add_trial(observation.frozen_trial(spec))
    points = [optuna_names(spec, p) for p in [*s.points_to_evaluate, *(warm.points if warm else [])]]
    algorithm = EvaluatedOptunaSearch(
        space=SearchSpace(spec), metric=s.metric, mode=s.mode, sampler=build_sampler(spec),
        storage=storage, study_name=STUDY_NAME, points_to_evaluate=points or None)
    return ConcurrencyLimiter(algorithm, max_concurrent=max_concurrent)


def build_scheduler(spec: SpecBase):
    """ASHA over the spec's epochs (FIFO with `search.scheduler: none`); across methods, one ASHA per method."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.search
    if s.scheduler == "none":
        return FIFOScheduler()
    # The trainer's own `epoch`, not Tune's training_iteration, which restarts after a trial restore.
    asha = dict(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=spec.training.epochs,
                grace_period=budget.grace_period(spec), reduction_factor=s.reduction_factor)
    return MethodwiseASHA(**asha) if len(spec.method_names()) > 1 else ASHAScheduler(**asha)


class MethodwiseASHA(FIFOScheduler):
    """One ASHA per method, for a search across methods.

    ASHA stops a trial that ranks low among the trials that reached the same epoch. Methods learn at
    different speeds, so one ASHA over all trials would stop a slow starter's trials for their method,
    not their settings, and TPE would then learn mostly about the fast starters. Here each method's
    trials are compared only with each other; which method wins is left to the objective at the
    full budget, and to TPE, which models `method.name` like any other choice.
    """

    def __init__(self, **asha: Any) -> None:
        super().__init__()
        self.asha = asha
        self.by_method: dict[str, Any] = {}  # a method name -> its own ASHA scheduler

    def _for(self, trial):
        from ray.tune.schedulers import ASHAScheduler

        method = str(field_values(getattr(trial, "config", None) or {}).get("method.name", ""))
        if method not in self.by_method:
            self.by_method[method] = ASHAScheduler(**self.asha)
        return self.by_method[method]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._for(trial).on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{method}: {s.debug_string()}" for method, s in self.by_method.items())
