"""Searching cheaply and confirming at scale: `data.subset`, `search.confirm.overrides`, rank transfer,
`search.warm_start`, ASHA's first rung after the warm-up, and Optuna's samplers (`search.sampler`)."""

import collections
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml

from ssl_tune import tracking
from ssl_tune.searching import budget, confirmation, warm_start
from ssl_tune.searching.algorithms import build_sampler, build_search_algorithm
from ssl_tune.data.datasets import DataError, ImageDataset, load_bundled, subset_rows
from ssl_tune.data.loader import Normalizer, ViewLoader
from ssl_tune.searching.space import ORIGIN_SAMPLER, field_values
from ssl_tune.spec import SpecError
from ssl_tune.spec.files import load_spec, spec_from_dict
from tests.conftest import ROOT, cli_env, ray_started, run_cli, search_spec, tiny_dataset, tiny_spec_dict

TWIST = f"{ROOT}/search_spaces/twist.yaml"


# --- data.subset ---------------------------------------------------------------------------------


def test_subset_is_stratified_by_class_and_fixed_by_its_seed():
    data = load_bundled()  # 10 classes of 1,000 training images
    rows = subset_rows(data, 0.25, seed=0)
    assert len(rows) == 2500 and torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == 2500
    assert collections.Counter(data.train_labels[rows].tolist()) == {c: 250 for c in range(10)}
    assert torch.equal(rows, subset_rows(data, 0.25, seed=0))  # the same images for every trial
    assert not torch.equal(rows, subset_rows(data, 0.25, seed=1))
    counted = subset_rows(data, 500, seed=0)  # a count: about 50 a class
    assert len(counted) == 500 and set(collections.Counter(data.train_labels[counted].tolist()).values()) == {50}
    assert subset_rows(data, 1.0, seed=0) is None and subset_rows(data, None, seed=0) is None
    with pytest.raises(DataError, match="data.subset .20000. asks for more than the data set's 10000"):
        subset_rows(data, 20000, seed=0)


def test_an_unlabelled_pretraining_split_is_subsampled_at_random():
    data = tiny_dataset(n=64)
    unlabelled = ImageDataset("stl-like", data.train_images, data.train_labels, data.test_images, data.test_labels, 4,
                              pretrain_images=torch.zeros(200, 1, 12, 12, dtype=torch.uint8))
    rows = subset_rows(unlabelled, 0.5, seed=3)
    assert len(rows) == 100 and rows.max() < 200 and torch.equal(rows, subset_rows(unlabelled, 0.5, seed=3))


def test_the_loader_draws_only_the_subsets_rows():
    data = tiny_dataset(n=96)
    rows = subset_rows(data, 0.5, seed=0)
    loader = ViewLoader(data.train_images, [], Normalizer(data.train_images), global_batch_size=8, seed=0, rows=rows)
    drawn = torch.cat(loader.indices(0))
    assert loader.steps_per_epoch == 6 and set(drawn.tolist()) <= set(rows.tolist()) and len(set(drawn.tolist())) == 48


def test_a_trainer_on_a_subset_trains_and_evaluates_on_those_images():
    from trainers.loop import Trainer

    spec = spec_from_dict(tiny_spec_dict(data={"subset": 0.5}, training={"epochs": 1, "batch_size": 16, "seed": 0},
                                         evaluation={"linear_probe": False, "bank_size": 24}))
    trainer = Trainer(spec, dataset=tiny_dataset(n=96))
    assert len(trainer.subset) == 48 and trainer.loader.steps_per_epoch == 3
    assert len(trainer.bank) == 24 and set(trainer.bank.tolist()) <= set(trainer.subset.tolist())  # the bank follows
    assert trainer.fit().status == "finished"
    resident = Trainer(spec.model_copy(update={"data": spec.data.model_copy(update={"on_device": True})}),
                       dataset=tiny_dataset(n=96))  # only the subset's images are held (on the device)
    assert torch.equal(resident.loader.images, tiny_dataset(n=96).train_images[trainer.subset])
    assert resident.loader.rows is None and resident.loader.steps_per_epoch == 3


def test_a_subset_smaller_than_the_batch_or_larger_than_the_data_is_refused_before_any_trial():
    from ssl_tune.cluster import _check_batch  # what `run` checks once the data is prepared (exit 2)

    spec = spec_from_dict(search_spec() | {"data": {"subset": 100}})
    with pytest.raises(SpecError, match=re.escape("training.batch_size (500) is larger than data set "
                                                  "'fashion_mnist_subset' (100 images in data.subset)")):
        _check_batch(spec, 10000)
    with pytest.raises(SpecError, match=re.escape("data.subset (100) asks for more than data set "
                                                  "'fashion_mnist_subset' holds (50 training images)")):
        _check_batch(spec, 50)


# --- search.confirm.overrides --------------------------------------------------------------------


def test_overrides_set_the_confirmations_setting_and_leave_the_search_alone():
    spec = load_spec(TWIST, ["data.subset=0.25", "training.epochs=4",
                             "search.confirm.overrides={training.epochs: 8, data.subset: null}"])
    confirming = spec.confirmation_spec()
    assert (spec.training.epochs, spec.data.subset) == (4, 0.25)
    assert (confirming.training.epochs, confirming.data.subset) == (8, None)
    assert confirming.search_ranges() == spec.search_ranges()  # it trains the search's values
    assert budget.confirmation_epochs(spec) == 24 * 8  # at most: 2 best and the default raced on up to 8 seeds
    assert budget.confirmation_cost(spec) == 24 * 8 * 4  # the console's ETA: each costs 4 epochs of the proxy's


@pytest.mark.parametrize("override, message", [
    ("{optimizer.lr: 1.0}", "search.confirm.overrides: optimizer.lr is searched (optimizer.lr); the confirmation trains "
                            "the search's values of it"),
    ("{method: {tau: 1.0}}", "search.confirm.overrides: method is searched (method.lam1, method.lam2, method.tau)"),
    ("{trainin.epochs: 8}", "search.confirm.overrides: 'trainin.epochs' is not a spec field"),
    ("{training.epoch: 8}", "search.confirm.overrides: training.epoch: Extra inputs are not permitted"),
    ("{training.epochs: 0}", "search.confirm.overrides: training.epochs: Input should be greater than or equal to 1"),
    ("{search.num_samples: 4}", "search.confirm.overrides: search.num_samples: the search's own settings"),
])
def test_a_bad_override_is_one_line_naming_the_file_and_the_field(override, message):
    with pytest.raises(SpecError, match=re.escape(message)) as caught:
        load_spec(TWIST, [f"search.confirm.overrides={override}"])
    assert str(caught.value).startswith(f"invalid spec {TWIST}") and len(str(caught.value).splitlines()) == 2


def test_validate_prints_the_search_and_the_confirmation_budgets(cli_here):
    status, out, err = cli_here("validate", TWIST, "--set", "data.subset=0.25", "--set", "training.epochs=4",
                                "--set", "search.confirm.overrides={training.epochs: 8, data.subset: null}")
    assert status == 0, err
    assert "search budget: about 43 epochs expected with ASHA (at epochs 2 only the best 1 in 3 goes on), at most 64; " \
        "4 epochs a trial, 0.25 of the training images, backbone small_cnn" in out
    assert "confirmation budget: at most 24 x 8 = 192 epochs; 8 epochs a trial, all training images, backbone small_cnn " \
        "(search.confirm.overrides)" in out


# --- ASHA's first rung ---------------------------------------------------------------------------


def _twist(*overrides):
    return load_spec(TWIST, list(overrides))


def test_ashas_first_rung_falls_after_the_warm_up_on_an_evaluated_epoch():
    assert budget.grace_period(_twist()) == 2 and budget.rungs(_twist()) == [2, 6]  # 1 warm-up epoch
    assert budget.grace_period(_twist("optimizer.warmup_epochs=0")) == 1
    assert budget.grace_period(_twist("optimizer.warmup_epochs=2.5")) == 4
    searched = _twist("optimizer.warmup_epochs={type: uniform, low: 0, high: 3}")
    assert budget.grace_period(searched) == 4  # the longest warm-up it may sample
    assert budget.rungs(_twist("evaluation.eval_every=3")) == [3, 6]  # ASHA decides where the objective is measured
    assert budget.grace_period(_twist("search.grace_period=1")) == 1  # given explicitly
    assert budget.grace_period(_twist("training.epochs=1")) == 1


# --- samplers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, cls", [("tpe", "TPESampler"), ("gp", "GPSampler"), ("cmaes", "CmaEsSampler"),
                                          ("qmc", "QMCSampler"), ("random", "RandomSampler")])
def test_each_sampler_is_optunas_own_and_proposes_inside_the_ranges(sampler, cls):
    spec = _twist(f"search.sampler={sampler}")
    assert type(build_sampler(spec)).__name__ == cls
    algorithm = build_search_algorithm(spec, max_concurrent=1)
    ranges = spec.search_ranges()
    for i in range(12):  # past the random start-up of the model-based ones (8)
        values = field_values(algorithm.suggest(f"t{i}"))
        assert all(ranges[p].low <= v <= ranges[p].high for p, v in values.items())
        algorithm.on_trial_complete(f"t{i}", {"knn_top1": -abs(math.log(values["method.tau"])), "epoch": 8})


def test_an_unknown_sampler_names_the_choices():
    with pytest.raises(SpecError, match=r"search.sampler: Input should be 'tpe', 'gp', 'cmaes', 'qmc' or 'random'"):
        _twist("search.sampler=bayes")


# --- rank transfer -------------------------------------------------------------------------------


def _row(configuration, search, mean):
    return {"configuration": configuration, "search_objective": search, "mean": mean, "ci95_low": mean - 1,
            "ci95_high": mean + 1}


def test_rank_transfer_is_spearman_between_search_scores_and_confirmed_means():
    kept = [_row("search #1", 80.0, 79.0), _row("search #2", 79.0, 78.5), _row("search #3", 78.0, 77.0)]
    assert confirmation.rank_transfer(kept) == (pytest.approx(1.0), 3)
    assert "kept the search's order" in confirmation.rank_transfer_line(confirmation.rank_transfer(kept))
    swapped = [_row("search #1", 80.0, 77.0), _row("search #2", 79.0, 78.5), _row("search #3", 78.0, 79.0),
               _row("default", math.nan, 76.0)]  # the default has no search score: left out
    rho, n = confirmation.rank_transfer(swapped)
    assert (rho, n) == (pytest.approx(-1.0), 3)
    line = confirmation.rank_transfer_line((rho, n))
    assert line == ("rank transfer: Spearman -1.00 over 3 configurations: the confirmation did not keep the search's "
                    "order, so the search's setting ranks these configurations differently from the confirmation's")
    assert confirmation.rank_transfer(kept[:2]) is None  # fewer than 3: no correlation worth reading


# --- warm start ----------------------------------------------------------------------------------


def test_warm_start_observations_sit_in_the_study_before_the_first_new_trial():
    spec = _twist()
    earlier = [warm_start.Observation({"method.lam1": 0.1 * i, "method.lam2": 1.0, "method.tau": 1.0 + 0.1 * i,
                                       "optimizer.lr": 1.5}, 70.0 + i, f"run{i}") for i in range(5)]
    algorithm = build_search_algorithm(spec, max_concurrent=1, warm=warm_start.WarmStart(observations=earlier))
    study = algorithm.searcher._ot_study
    assert len(study.trials) == 5 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.best_trial.params["method.tau"] == pytest.approx(1.4)
    algorithm.suggest("t0")
    assert len(study.trials) == 6  # the new trial comes after them


def test_an_earlier_trial_counts_only_inside_this_specs_ranges():
    spec = _twist()
    params = {"method.lam1": "0.1", "method.lam2": "1.0", "method.tau": "1.5", "optimizer.lr": "1.0"}
    assert warm_start.values_in_space(spec, params) == {"method.lam1": 0.1, "method.lam2": 1.0, "method.tau": 1.5,
                                                        "optimizer.lr": 1.0}
    assert warm_start.values_in_space(spec, {**params, "method.tau": "9.0"}) is None  # outside 0.25 to 2
    assert warm_start.values_in_space(spec, {k: v for k, v in params.items() if k != "optimizer.lr"}) is None


def test_the_setting_is_every_fixed_field_but_where_and_how_trials_run():
    spec = _twist()
    assert not warm_start.setting_differences(spec, _twist("search.num_samples=4", "resources.cpus_per_worker=2",
                                                           "name=other", "search.sampler=gp"))
    assert warm_start.setting_differences(spec, _twist("data.subset=0.25")) == ["data.subset None here, 0.25 there"]
    assert warm_start.setting_differences(spec, _twist("search.metric=rankme")) == [
        "search.metric 'knn_top1' here, 'rankme' there"]
    assert warm_start.setting_differences(spec, _twist("training.epochs=4")) == ["training.epochs 8 here, 4 there"]


def test_a_warm_start_from_an_unknown_search_is_exit_2_naming_the_store(tmp_path, cli_here):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(search_spec(warm_start=["no-such-search"])))
    status, out, err = cli_here("run", "spec.yaml")
    assert status == 2, err[-2000:]
    assert "search.warm_start: no MLflow experiment, search name or run id 'no-such-search' in the tracking store " \
        f"sqlite:///{tmp_path}/mlflow.db" in err
    assert "cluster" not in out  # before Ray started
    assert not ray_started()


# --- a proxy search end to end -------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_overrides_reach_only_the_confirmation_trials_and_their_mlflow_params(proxy_search):
    work, client, proc, _ = proxy_search
    parent = tracking.find_parent_run(client, "proxy")
    trials = tracking.child_runs(client, parent, tracking.KIND_TRIAL)
    confirmations = tracking.child_runs(client, parent, tracking.KIND_CONFIRMATION)
    assert len(trials) == 3 and len(confirmations) == 6
    assert {(t.data.params["data.subset"], t.data.params["training.epochs"]) for t in trials} == {("0.2", "1")}
    assert {(c.data.params["data.subset"], c.data.params["training.epochs"]) for c in confirmations} == {("0.4", "2")}
    assert all(c.data.metrics["epoch"] == 2 for c in confirmations)
    assert "re-trained on 2 fresh seeds (2 epochs a run, at data.subset 0.4, training.epochs 2)" in proc.stdout  # (YAML)
    assert {t.data.tags[tracking.TAG_ORIGIN] for t in trials} == {ORIGIN_SAMPLER}


@pytest.mark.ray
@pytest.mark.slow
def test_rank_transfer_reaches_the_console_results_the_parent_and_its_figure(proxy_search, cli_here):
    work, client, proc, _ = proxy_search
    parent = tracking.find_parent_run(client, "proxy")
    rho = parent.data.metrics["confirm_rank_spearman"]
    assert -1 <= rho <= 1 and f"rank transfer: Spearman {rho:+.2f} over 3 configurations" in proc.stdout
    assert parent.data.tags[tracking.TAG_RANK_TRANSFER].startswith(f"rank transfer: Spearman {rho:+.2f}")
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    assert "figures/rank_transfer.png" in artifacts
    table = tracking.confirmation_table(client, parent)
    assert all(not math.isnan(r["search_objective"]) for r in table)  # each one's single run in the search
    status, results, _ = cli_here("results", "proxy", cwd=work)
    assert status == 0 and f"rank transfer: Spearman {rho:+.2f} over 3 configurations" in results


@pytest.mark.ray
@pytest.mark.slow
def test_warm_start_from_a_finished_search_as_observations_and_as_configurations(proxy_search):
    work, client, _, raw = proxy_search
    uri = f"sqlite:///{work}/mlflow.db"
    parent = tracking.find_parent_run(client, "proxy")
    # The same setting: every finished or stopped trial is an observation, in the study before the first new trial.
    same = spec_from_dict({**raw, "search": {**raw["search"], "warm_start": ["proxy"], "seed": 1}})
    warm = warm_start.gather(same, client, uri)
    finished = [t for t in tracking.leaderboard(client, parent) if t["status"] in (tracking.FINISHED, tracking.STOPPED)]
    assert len(warm.observations) == len(finished) == 3 and not warm.points
    study = build_search_algorithm(same, 1, warm).searcher._ot_study
    assert sorted(t.value for t in study.trials) == sorted(t["objective"] for t in finished)
    # Another setting (a quarter of the images): only the search's best configuration, tried first.
    other = {**raw, "data": {"subset": 0.25}, "search": {**raw["search"], "warm_start": [parent.info.run_id],
                                                          "num_samples": 2, "confirm": {"top_k": 0}}}
    (work / "other.yaml").write_text(yaml.safe_dump(other))
    proc = run_cli(["run", "other.yaml", "--name", "other"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "another setting (data.subset 0.25 here, 0.2 there), its best configuration tried first" in proc.stdout
    second = tracking.find_parent_run(client, "other")
    assert second.data.params["warm_start.configurations"] == "1" and second.data.params["warm_start.observations"] == "0"
    assert "proxy (" in second.data.tags[tracking.TAG_WARM_START]
    best = client.get_run(tracking.best_trial_run_id(client, parent)).data.params
    origins = {t.data.tags[tracking.TAG_ORIGIN]: t for t in tracking.child_runs(client, second, tracking.KIND_TRIAL)}
    assert set(origins) == {"warm_start:proxy", ORIGIN_SAMPLER}
    tried = origins["warm_start:proxy"].data.params
    assert all(tried[p] == best[p] for p in ("method.lam2", "method.tau"))


@pytest.mark.ray
@pytest.mark.slow
def test_each_new_sampler_runs_a_tiny_search(tmp_path):
    """gp, cmaes and qmc, each a search of 3 one-epoch trials (one random start-up trial, then the sampler)."""
    raw = search_spec(num_samples=3, points_to_evaluate=[], startup_trials=1)
    raw["training"]["epochs"] = 1  # what is tested is the proposals
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    script = ("import ssl_tune\n"
              "for sampler in ('gp', 'cmaes', 'qmc'):\n"
              "    ssl_tune.search('spec.yaml', overrides={'search.sampler': sampler}, name=sampler)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=cli_env())  # one process: one Ray instance for the three
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    for sampler in ("gp", "cmaes", "qmc"):
        parent = tracking.find_parent_run(client, sampler)
        assert parent.info.status == "FINISHED"
        trials = tracking.leaderboard(client, parent)
        assert len(trials) == 3 and all(t["status"] == tracking.FINISHED for t in trials)
        assert len({(t["method.lam2"], t["method.tau"]) for t in trials}) == 3  # three distinct proposals
