"""Optuna receives the trials' results: later proposals depend on earlier results."""

import math

import pytest

from ssl_tune.searching.algorithms import build_scheduler, build_search_algorithm, startup_trials
from ssl_tune.searching.space import SearchSpace, field_values
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import tiny_spec_dict

TRIALS = 40


def spec(seed=0, sampler="tpe"):
    raw = tiny_spec_dict()
    raw["method"].update(lam1={"type": "uniform", "low": -0.5, "high": 0.5},
                         tau={"type": "loguniform", "low": 0.1, "high": 10.0})
    raw["optimizer"]["name"] = {"type": "choice", "values": ["sgd", "lars"]}
    raw["projector"]["output_dim"] = {"type": "int", "low": 8, "high": 64, "step": 8}
    raw["search"] = {"seed": seed, "metric": "knn_top1", "mode": "max", "sampler": sampler}
    return spec_from_dict(raw)


def drive(objective, seed=0, sampler="tpe"):
    """Run the search algorithm sequentially, as Tune does, with a synthetic objective."""
    algorithm = build_search_algorithm(spec(seed, sampler), max_concurrent=1)
    proposals = []
    for i in range(TRIALS):
        config = algorithm.suggest(f"t{i}")
        proposals.append(config)
        algorithm.on_trial_complete(f"t{i}", {"knn_top1": objective(config), "epoch": 1})
    return proposals


def peak(config):
    return -abs(config["method.lam1"] - 0.3) - abs(math.log(config["method.tau"]))


def test_space_covers_every_range_type():
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    SearchSpace(spec())(trial)
    space = trial.distributions
    assert set(space) == {"method.lam1", "method.tau", "optimizer.name", "projector.output_dim"}
    assert space["method.tau"].log and space["projector.output_dim"].step == 8


def conditional_spec(**search):
    raw = tiny_spec_dict()
    raw["optimizer"] = {"name": {"type": "choice", "values": ["lars", "adamw"], "branches": {
        "lars": {"optimizer.lr": {"type": "loguniform", "low": 0.2, "high": 4.0}},
        "adamw": {"optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                  "optimizer.weight_decay": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}}},
        "lr": 0.5, "weight_decay": 1e-5}
    raw["search"] = search
    return spec_from_dict(raw)


def test_a_choice_samples_only_the_taken_branch():
    s = conditional_spec(points_to_evaluate=[{"optimizer.name": "adamw", "optimizer.lr": 0.005}])
    algorithm = build_search_algorithm(s, max_concurrent=1)
    seen = set()
    for i in range(12):
        config = algorithm.suggest(f"t{i}")
        name = config["optimizer.name"]
        seen.add(name)
        assert set(config) == {"optimizer.name", f"optimizer.lr|{name}"} | (
            {"optimizer.weight_decay|adamw"} if name == "adamw" else set())
        resolved = s.resolve(field_values(config))
        low, high = (0.2, 4.0) if name == "lars" else (1e-4, 1e-2)
        assert low <= resolved.optimizer.lr <= high
        assert resolved.optimizer.weight_decay == (1e-5 if name == "lars" else config["optimizer.weight_decay|adamw"])
        if i == 0:  # the warm-start point, translated to the branch's parameter
            assert config == {"optimizer.name": "adamw", "optimizer.lr|adamw": 0.005,
                              "optimizer.weight_decay|adamw": config["optimizer.weight_decay|adamw"]}
        algorithm.on_trial_complete(f"t{i}", {"knn_top1": float(i), "epoch": 1})
    assert seen == {"lars", "adamw"}


def test_train_resolves_the_default_branch():
    resolved = conditional_spec().resolve()
    assert resolved.optimizer.name == "lars" and resolved.optimizer.lr == pytest.approx(math.sqrt(0.8))
    assert resolved.optimizer.weight_decay == 1e-5


@pytest.mark.parametrize("branches,message", [
    ({"sgd": {"optimizer.lr": {"type": "uniform", "low": 0.1, "high": 1}}}, "not among the values"),
    ({"adamw": {"optimizer.nothing": {"type": "uniform", "low": 0.1, "high": 1}}}, "must name a field"),
    ({"adamw": {"optimizer.lr": {"type": "uniform", "low": -1, "high": 1}}}, "greater than 0"),
])
def test_bad_branches_are_spec_errors(branches, message):
    from ssl_tune.spec import SpecError

    raw = tiny_spec_dict()
    raw["optimizer"]["name"] = {"type": "choice", "values": ["lars", "adamw"], "branches": branches}
    with pytest.raises(SpecError, match=message):
        spec_from_dict(raw)


def test_same_seed_and_results_give_the_same_proposals():
    assert drive(peak) == drive(peak)


def test_proposals_follow_the_results():
    a, b = drive(peak), drive(lambda c: -peak(c))
    startup = startup_trials(spec())
    assert startup == 8  # 2 per searched parameter
    assert a[:startup] == b[:startup]  # random start-up: results not used yet
    assert a[startup] != b[startup]  # then the sampler models the results
    # Told that `peak` is good, TPE proposes near its optimum; told the opposite, far from it.
    mean_peak = lambda proposals: sum(map(peak, proposals[20:])) / len(proposals[20:])  # noqa: E731
    assert mean_peak(a) > mean_peak(b) + 1.0


def test_startup_trials_default_to_two_per_parameter_at_most_ten():
    assert startup_trials(conditional_spec()) == 6  # optimizer.name and its branches' lr and weight_decay
    raw = tiny_spec_dict()
    raw["method"].update({k: {"type": "uniform", "low": 0.1, "high": 1.0} for k in ("lam1", "lam2", "tau")})
    raw["optimizer"].update({k: {"type": "uniform", "low": 0.1, "high": 0.5} for k in ("lr", "weight_decay", "momentum")})
    assert startup_trials(spec_from_dict(raw)) == 10
    raw["search"] = {"startup_trials": 3}
    assert startup_trials(spec_from_dict(raw)) == 3


def test_random_sampler_ignores_the_results():
    # The baseline of the search-efficiency benchmark: the same proposals whatever the results.
    a, b = drive(peak, sampler="random"), drive(lambda c: -peak(c), sampler="random")
    assert a == b and a != drive(peak, seed=1, sampler="random")


def test_asha_uses_the_trainers_epoch():
    s = build_scheduler(spec())
    assert s._time_attr == "epoch" and s._max_t == 2


def test_points_to_evaluate_must_name_searched_fields():
    from ssl_tune.spec import SpecError

    raw = tiny_spec_dict()
    raw["method"]["tau"] = {"type": "loguniform", "low": 0.1, "high": 1.0}
    raw["search"] = {"points_to_evaluate": [{"method.lam1": 0.1}]}
    with pytest.raises(SpecError, match=r"search.points_to_evaluate.0: method.lam1 not searched"):
        spec_from_dict(raw)


def test_one_best_trial_rule_skips_failed_trials_and_nan_and_follows_the_mode():
    from ssl_tune.searching.space import best_trial, better, ranked

    rows = [{"run_id": "nan", "objective": float("nan"), "status": "stopped"},
            {"run_id": "failed", "objective": 99.0, "status": "failed"},
            {"run_id": "low", "objective": 70.0, "status": "finished"},
            {"run_id": "high", "objective": 80.0, "status": "stopped"}]
    assert best_trial(rows, "max")["run_id"] == "high"
    assert best_trial(rows, "min")["run_id"] == "low"
    assert [r["run_id"] for r in ranked(rows, "max")] == ["failed", "high", "low", "nan"]
    assert best_trial(rows[:2], "max") is None
    assert better(1.0, float("nan"), "max") and not better(float("nan"), 1.0, "max") and not better(1.0, 1.0, "min")


def cross_method_spec_dict():
    raw = tiny_spec_dict()
    raw["method"] = {"name": {"type": "choice", "values": ["twist", "isd"],
                              "branches": {"twist": {"method.tau": {"type": "loguniform", "low": 0.25, "high": 2.0}},
                                           "isd": {"method.t_teacher": {"type": "loguniform", "low": 0.005, "high": 0.1}}}}}
    raw["training"] = {"epochs": 4, "batch_size": 32, "seed": 0}
    raw["search"] = {"metric": "knn_top1", "mode": "max", "reduction_factor": 2, "grace_period": 1}
    return raw


def test_early_stopping_across_methods_compares_each_method_with_itself():
    """ISD starts slower than TWIST here (epoch-1 kNN 60s against 80s): one ASHA over all trials stops
    every ISD trial at the first rung; one ASHA per method keeps the better ISD trials running."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from ssl_tune.searching.algorithms import MethodwiseASHA

    spec = spec_from_dict(cross_method_spec_dict())
    assert spec.method_names() == ["twist", "isd"] and spec.resolve().method.name == "twist"

    def continued(scheduler):
        trials = [SimpleNamespace(trial_id=f"{m}{i}", config={"method.name": m}) for i in range(6) for m in ("twist", "isd")]
        kept = []
        for trial in trials:
            scheduler.on_trial_add(None, trial)
            value = (80.0 if trial.config["method.name"] == "twist" else 60.0) + int(trial.trial_id[-1])
            result = {"epoch": 1, "training_iteration": 1, "knn_top1": value}
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.CONTINUE:
                kept.append(trial.trial_id)
        return kept

    import numpy as np

    np.random.seed(0)  # ASHA draws a bracket per trial from numpy's global generator
    assert isinstance(build_scheduler(spec), MethodwiseASHA)
    one = continued(ASHAScheduler(time_attr="epoch", metric="knn_top1", mode="max", max_t=4, grace_period=1,
                                  reduction_factor=2))
    per_method = continued(build_scheduler(spec))
    assert not [t for t in one if t.startswith("isd") and t != "isd0"]  # only the first, with nothing to compare
    assert {"isd3", "isd4", "isd5"} <= set(per_method) and {"twist3", "twist4", "twist5"} <= set(per_method)


def test_a_search_across_methods_samples_each_methods_own_ranges():
    spec = spec_from_dict(cross_method_spec_dict())
    assert set(spec.searchable_paths()) == {"method.name", "method.tau", "method.t_teacher"}
    algorithm = build_search_algorithm(spec, max_concurrent=1)
    seen = set()
    for i in range(12):
        config = algorithm.suggest(f"t{i}")
        resolved = spec.resolve(field_values(config))
        seen.add(resolved.method.name)
        own = "method.tau" if resolved.method.name == "twist" else "method.t_teacher"
        assert set(field_values(config)) == {"method.name", own}
        algorithm.on_trial_complete(f"t{i}", {"knn_top1": 70.0 + i, "epoch": 4})
    assert seen == {"twist", "isd"}
