"""The benchmark harness: search replay on a known table, the efficiency measures, and the report."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks import __main__ as harness
from benchmarks import search_efficiency as se
from ssl_tune.searching.budget import rungs as budget_rungs
from ssl_tune.spec.files import load_spec
from tests.conftest import IPROUTE_INSTALL, ROOT, method_names, namespaces_allowed, require_system, tiny_spec_dict

EPOCHS = 8  # search_spaces/twist.yaml
BEST = (1.0, 0.5)  # (lr, tau) of the synthetic table's best point


def spec():
    return load_spec(se.DEFAULT_SPEC, se.DEFAULT_FIXED)


def synthetic_table(points=5, diverged=(4.0, 2.0)):
    """Objective peaked at BEST in log space, rising by 1 per epoch; one point diverges in epoch 3."""
    axes = se.grid_axes(spec(), points)
    axes = {"optimizer.lr": sorted({*axes["optimizer.lr"], BEST[0]}), "method.tau": sorted({*axes["method.tau"], BEST[1]})}
    rows = []
    for lr in axes["optimizer.lr"]:
        for tau in axes["method.tau"]:
            final = 80 - 3 * math.log(lr / BEST[0]) ** 2 - 3 * math.log(tau / BEST[1]) ** 2
            curve = [final - (EPOCHS - e) for e in range(1, EPOCHS + 1)]
            status = "finished"
            if (lr, tau) == diverged:
                curve, status = curve[:2], "diverged"
            rows.append({"values": {"optimizer.lr": lr, "method.tau": tau}, "status": status, "curve": curve,
                         "diverged_reason": None, "seconds": 1.0})
    return {"spec": str(se.DEFAULT_SPEC), "overrides": se.DEFAULT_FIXED, "metric": "knn_top1", "mode": "max",
            "epochs": EPOCHS, "axes": axes, "points": rows}


def test_lookup_takes_the_nearest_point_in_the_sampling_scale():
    table = synthetic_table()
    lookup = se.TableLookup(table, spec())
    lrs = table["axes"]["optimizer.lr"]  # 0.2, ~0.42, ~0.89, 1.0, ~1.89, 4.0
    geometric_mid = math.sqrt(lrs[0] * lrs[1])
    assert lookup.row({"optimizer.lr": geometric_mid * 0.99, "method.tau": 0.5})["values"]["optimizer.lr"] == lrs[0]
    assert lookup.row({"optimizer.lr": geometric_mid * 1.01, "method.tau": 0.5})["values"]["optimizer.lr"] == lrs[1]


def test_best_so_far_ranks_each_trial_by_its_latest_value():
    results = [(0, 1, 70.0), (1, 1, 75.0), (0, 2, 78.0), (1, 2, math.nan), (2, 1, 72.0)]
    assert se.best_so_far(results, "max") == [70.0, 75.0, 78.0, 78.0, 78.0]
    # A trial's latest value replaces its earlier one, as on the leaderboard.
    assert se.best_so_far([(0, 1, 9.0), (0, 2, 5.0)], "max") == [9.0, 5.0]
    assert se.best_so_far([(0, 1, 3.0), (1, 1, 2.0)], "min") == [3.0, 2.0]


def test_compute_to_reach():
    assert se.compute_to_reach([70, 75, 78, 78], 75, "max") == 2
    assert se.compute_to_reach([70, 75], 76, "max") == math.inf
    assert se.compute_to_reach([3, 2, 1], 2, "min") == 2


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_replay_without_early_stopping_runs_whole_trials_within_the_budget(sampler):
    budget = 5 * EPOCHS
    results = se.replay_search(synthetic_table(), spec(), sampler, "none", seed=0, budget=budget)
    assert len(results) == budget
    last = {}
    for trial, epoch, value in results:
        assert epoch == last.get(trial, (0, 0.0))[0] + 1  # every trial reports its epochs in order
        last[trial] = (epoch, value)
    # Two trials at a time: all but the (at most 2) still running at the end completed or diverged.
    assert sum(1 for epoch, value in last.values() if epoch < EPOCHS and not math.isnan(value)) <= 2


def test_replay_with_asha_stops_trials_and_starts_more():
    budget = 6 * EPOCHS
    results = se.replay_search(synthetic_table(), spec(), "tpe", "asha", seed=0, budget=budget)
    assert len(results) == budget
    epochs = {}
    for trial, epoch, _ in results:
        epochs[trial] = epoch
    assert len(epochs) > 10  # many more trials than the 6 full ones the budget pays for
    first_rung = budget_rungs(spec())[0]  # after the warm-up (`search.grace_period`'s default)
    assert first_rung == 2 and sum(e == first_rung for e in epochs.values()) >= 4  # stopped at the first rung
    assert max(epochs.values()) == EPOCHS  # and the best were promoted to the end


def test_a_diverged_point_reports_nan_and_never_counts_as_best():
    table = synthetic_table(points=2, diverged=(4.0, 2.0))
    results = se.replay_search(table, spec(), "random", "none", seed=0, budget=30 * EPOCHS)
    lookup = se.TableLookup(table, spec())
    nans = [r for r in results if math.isnan(r[2])]
    assert nans and all(epoch == 3 for _, epoch, _ in nans)
    assert all(not math.isnan(v) for v in se.best_so_far(results, "max"))
    assert lookup.row({"optimizer.lr": 4.0, "method.tau": 2.0})["status"] == "diverged"


def test_tpe_with_early_stopping_finds_the_synthetic_optimum_sooner_than_random():
    table = synthetic_table(points=7)
    budget = 10 * EPOCHS
    mean = {}
    for sampler, scheduler in (("tpe", "asha"), ("random", "none")):
        curves = [se.best_so_far(se.replay_search(table, spec(), sampler, scheduler, seed, budget), "max")
                  for seed in range(4)]
        mean[sampler] = np.mean(curves, axis=0)
    target = mean["random"][-1]
    assert se.compute_to_reach(list(mean["tpe"]), target, "max") < budget


def test_one_epoch_baseline_trains_every_point_once_then_the_best_in_full():
    table = synthetic_table(points=7)
    budget = 10 * EPOCHS
    results = se.one_epoch_then_top(table, seed=0, budget=budget)
    points = len([p for p in table["points"] if p["curve"]])
    full = {i for i, epoch, _ in results if epoch == EPOCHS}
    assert len(results) <= budget and len({i for i, _, _ in results}) == points
    assert len(full) == (budget - points) // (EPOCHS - 1)
    finals = [p["curve"][-1] for p in table["points"] if p["status"] == "finished"]
    assert se.best_so_far(results, "max")[-1] == max(finals)  # the synthetic curves keep their order


def test_noise_floor_is_the_pooled_seed_sd_and_rankme_is_compared_by_rank():
    from benchmarks import noise

    def run(lr, seed, knn, rankme):
        return {"values": {"optimizer.lr": lr}, "seed": seed, "status": "finished", "curve": [knn], "rankme": [rankme]}

    runs = [run(0.1, 1, 70.0, 5.0), run(0.1, 2, 72.0, 5.5), run(1.0, 1, 80.0, 9.0), run(1.0, 2, 81.0, 8.0),
            run(2.0, 1, 75.0, 7.0), run(2.0, 2, 75.0, 7.1)]
    result = noise.summarise(runs, {"final_best": {"random": {"mean": 78.0}, "TPE + ASHA": {"mean": 78.5}}})
    # variances 2, 0.5 and 0 with one degree of freedom each
    assert result["noise_floor_sd"] == pytest.approx(math.sqrt(2.5 / 3)) and result["noise_floor_dof"] == 3
    assert result["spearman_points"] == pytest.approx(1.0)
    assert result["strategy_gaps"]["TPE + ASHA"] == {"gap_to_random": 0.5, "exceeds_noise": False}


def test_warm_start_reads_its_noise_floor_from_the_noise_benchmarks_result(tmp_path):
    from benchmarks import proxy_search

    recorded = json.loads((Path(ROOT) / "docs" / "benchmarks" / "noise.json").read_text())["noise_floor_sd"]
    assert proxy_search.measured_noise_floor() == recorded
    (tmp_path / "noise.json").write_text(json.dumps({"noise_floor_sd": 1.25}))
    assert proxy_search.measured_noise_floor(tmp_path / "noise.json") == 1.25
    with pytest.raises(SystemExit, match=r"no noise floor in .*missing.json.*python -m benchmarks noise"):
        proxy_search.measured_noise_floor(tmp_path / "missing.json")


@pytest.mark.slow
def test_efficiency_end_to_end_writes_json_figure_and_report(tmp_path):
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    results.mkdir()
    table = synthetic_table()
    table.update(command="python -m benchmarks efficiency-table", date="2026-01-01",
                 machine={"cpu": "test cpu", "cores": 2, "memory_gib": 1, "python": "3", "torch": "2", "commit": "abc"})
    (results / "efficiency-table.json").write_text(json.dumps(table))
    harness.main(["--results", str(results), "--report", str(report), "efficiency", "--seeds", "2", "--budget-trials", "3"])
    result = json.loads((results / "efficiency.json").read_text())
    assert set(result["curves"]) == set(se.STRATEGIES) | {se.ONE_EPOCH_BASELINE}
    assert all(len(c) == 3 * EPOCHS for curves in result["curves"].values() for c in curves)
    assert result["ratio_to_random"]["random"] == 1.0
    assert (results / se.FIGURE).stat().st_size > 10_000
    text = report.read_text()
    assert "efficiency --seeds 2 --budget-trials 3`" in text
    assert f"![best objective against compute](results/{se.FIGURE})" in text
    assert "| TPE + ASHA |" in text and "| 0.2 |" in text  # the strategies' table and the grid's
    assert "Not measured yet. Command: `python -m benchmarks gpu-throughput`" in text


@pytest.mark.slow
def test_throughput_and_loss_scaling_through_the_harness(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_dict(data={"name": "fashion_mnist_subset"})))
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    common = ["--results", str(results), "--report", str(report)]
    harness.main([*common, "throughput", "--specs", str(spec_file), "--repeats", "1", "--set", "training.batch_size=512",
                  "--backbones", "timm:vit_tiny_patch16_224", "--backbone-images", "256"])
    row, vit = json.loads((results / "throughput.json").read_text())["rows"]
    assert row["ratio"] > 0 and 0 < row["data_share"] < 1
    assert (vit["backbone"], vit["images"], vit["batch_size"]) == ("timm:vit_tiny_patch16_224", 256, 128) and vit["ratio"] > 0
    assert "| twist | timm:vit_tiny_patch16_224 | 128 |" in report.read_text()
    harness.main([*common, "loss-scaling", "--part", "corinfomax", "isd", "--corinfomax-dims", "8", "16",
                  "--isd-bank-sizes", "64", "128", "--repeats", "1"])
    scaling = json.loads((results / "loss-scaling.json").read_text())
    assert [r["dim"] for r in scaling["corinfomax"]["rows"]] == [8, 16] and "hsic" not in scaling
    text = report.read_text()
    assert "| twist | small_cnn | 512 |" in text and "**CorInfoMax** (batch 256)" in text and "| 16 |" in text


@pytest.mark.slow
def test_data_benchmark_through_the_harness(tmp_path):
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    harness.main(["--results", str(results), "--report", str(report), "data", "--images", "300", "--size", "32",
                  "--folder", str(tmp_path / "folder"), "--steps", "2", "--repeats", "1", "--batch-size", "64"])
    result = json.loads((results / "data.json").read_text())
    assert result["images"] == 300 and result["decode"]["ratio"] > 0
    assert 0 < result["first_step"]["cache_s"] and 0 < result["throughput"]["ratio"]
    # Two trials share the mapped pages; private copies are one each (PSS adds up to what the node holds).
    assert result["memory"]["mapped_pss_over_one_copy"] < result["memory"]["in_memory_pss_over_one_copy"]
    e = result["evaluation"]
    assert e["before"]["bank"] == e["now"]["bank"] == 270 and 0 < e["now"]["ratio"]  # 300 is below the bank's cap
    assert e["now"]["anon_peak"] >= e["now"]["anon_base"] > 0
    assert "| decode, images/s" in report.read_text() and "| evaluation time per evaluated epoch" in report.read_text()


def test_gpu_throughput_counts_flops(tmp_path):
    import argparse

    from benchmarks import throughput

    parser = argparse.ArgumentParser()
    throughput.add_gpu_arguments(parser)
    args = parser.parse_args(["--allow-cpu", "--images", "8", "--batch-sizes", "8", "--repeats", "1"])
    result = throughput.run_gpu(args)
    row = result["rows"][0]
    # ResNet-18 with the CIFAR stem: ~0.56 GFLOP (multiply-adds) forward per 32x32 image; two views,
    # forward + backward (~3x) and 2 FLOPs per multiply-add: ~6.7 GFLOP per image of the batch.
    assert 4e9 < row["step_flops"] / 8 < 10e9
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12 and throughput.peak_flops("cpu") is None
    assert "| 8 | fp32 |" in throughput.report_gpu(result, ".")


@pytest.mark.slow
def test_backbones_benchmark_trains_a_vit_tiny_and_the_small_cnn_per_method(tmp_path):
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    harness.main(["--results", str(results), "--report", str(report), "backbones", "--methods", "twist", "--epochs", "1",
                  "--images", "256", "--set", "training.batch_size=128", "--set", "evaluation.linear_probe_epochs=1"])
    rows = json.loads((results / "backbones.json").read_text())["rows"]
    assert [(r["method"], r["backbone"], r["status"]) for r in rows] == [("twist", "small_cnn", "finished"),
                                                                          ("twist", "vit_tiny", "finished")]
    assert rows[1]["parameters"] > 5e6 and all(0 < r["knn_top1"] <= 100 for r in rows)
    assert "| twist | vit_tiny | 5.35M |" in report.read_text()


def test_gpu_check_runs_its_whole_path_on_a_cpu(tmp_path):
    """The GPU check's code, with a small network and cache on the CPU (it measures only on a GPU)."""
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    harness.main(["--results", str(results), "--report", str(report), "gpu-check", "--allow-cpu", "--backbone",
                  "small_cnn", "--sizes", "16", "--images", "96", "--test-images", "32", "--batch-size", "16",
                  "--steps", "2", "--method-backbones", "timm:vit_tiny_patch16_224@16",
                  "--method-steps", "2"])
    result = json.loads((results / "gpu-check.json").read_text())
    streamed, resident = result["rows"]
    assert (streamed["mode"], resident["mode"]) == ("streamed", "resident")
    assert streamed["images_per_s"] > 0 and streamed["streamed_over_resident"] > 0 and 0 < streamed["eval_share_here"]
    assert "| 16 px | streamed |" in report.read_text()
    rows = result["method_rows"]
    assert {(r["method"], r["backbone"]) for r in rows} == {(m, "timm:vit_tiny_patch16_224") for m in method_names()}
    assert all(r["images_per_s"] > 0 and r["drift"] >= 0 for r in rows)
    assert "| twist | timm:vit_tiny_patch16_224 | 16 px |" in report.read_text()


@pytest.mark.ray
@pytest.mark.netns
@pytest.mark.slow
def test_cluster_benchmark_through_the_harness(tmp_path):
    require_system(namespaces_allowed(), "network namespaces", IPROUTE_INSTALL)
    harness.main(["--results", str(tmp_path), "--report", str(tmp_path / "b.md"), "cluster", "--epochs", "2",
                  "--repeats", "1", "--set", "data.subset=0.2", "--set", "backbone.width=4"])
    result = json.loads((tmp_path / "cluster.json").read_text())
    assert [r["worker_nodes"] for r in result["runs"]["one_host"]] == [1.0]
    assert [r["worker_nodes"] for r in result["runs"]["two_hosts"]] == [2.0]
    assert result["two_hosts_over_one_host"] > 0
    assert "| two hosts over a veth link, 1 CPU each | 2 | " in (tmp_path / "b.md").read_text()


# A search on the bundled data small enough to take seconds: what the smoke runs below override.
SMOKE = ["training.epochs=1", "search.num_samples=2", "backbone.width=4", "evaluation.linear_probe=false",
         "training.batch_size=512", "data.subset=0.2"]


def test_every_benchmark_has_a_smoke_run_in_the_suite():
    """A benchmark that no test runs breaks silently (search-overhead once called a function that had moved)."""
    text = Path(__file__).read_text()
    calls = re.findall(r"harness\.main\((.*?)\)\n", text, flags=re.S)
    calls += re.findall(r'"-m", "benchmarks", (.*?)\]', text, flags=re.S)  # run in a process of its own
    through_harness = {word for call in calls for word in re.findall(r'"([a-z-]+)"', call)}
    called = {name for name, (_, run) in harness.BENCHMARKS.items()
              if f"{run.__module__.rpartition('.')[2]}.{run.__name__}(" in text}
    assert set(harness.BENCHMARKS) - through_harness - called == set()


def _smoke_dirs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    results, report = tmp_path / "results", tmp_path / "benchmarks.md"
    return results, report, ["--results", str(results), "--report", str(report)]


def _sections_rendered(report: Path, *names: str) -> None:
    text = report.read_text()
    for name in names:
        assert f"Not measured yet. Command: `python -m benchmarks {name}`" not in text, name
        assert f"--report {report} {name} " in text, name  # with the command that measured it


def _small_twist(tmp_path: Path) -> Path:
    small = tmp_path / "small.yaml"
    spec = yaml.safe_load((Path(ROOT) / "search_spaces" / "twist.yaml").read_text())
    spec["backbone"]["width"], spec["training"]["batch_size"], spec["data"] = 4, 512, {"subset": 0.2}
    small.write_text(yaml.safe_dump(spec))
    return small


# The search benchmarks, one test each (so that they can run side by side under pytest-xdist).


@pytest.mark.ray
@pytest.mark.slow
def test_the_search_overhead_benchmark_runs_at_a_smoke_size(tmp_path):
    """search-overhead runs a real search in-process, against the same trials as bare trainer calls."""
    results, report, common = _smoke_dirs(tmp_path)
    # In its own process: it runs a search in-process (Ray, and the console's redirection of the output)
    in_process = subprocess.run([sys.executable, "-m", "benchmarks", *common, "search-overhead", "--spec",
                                 str(_small_twist(tmp_path)), "--trials", "1", "--epochs", "1", "--workers", "1"],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert in_process.returncode == 0, in_process.stdout[-2000:] + in_process.stderr[-2000:]
    overhead = json.loads((results / "search-overhead.json").read_text())
    assert overhead["rows"][0]["trials"] == 1 and overhead["rows"][0]["ratio"] > 0
    _sections_rendered(report, "search-overhead")


@pytest.mark.ray
@pytest.mark.slow
def test_the_knn_bank_benchmark_runs_at_a_smoke_size(tmp_path):
    results, report, common = _smoke_dirs(tmp_path)
    harness.main([*common, "knn-bank", "--banks", "50", *[x for o in SMOKE for x in ("--set", o)]])
    bank = json.loads((results / "knn-bank.json").read_text())
    assert set(bank["banks"]) == {"50"}
    _sections_rendered(report, "knn-bank")


@pytest.mark.ray
@pytest.mark.slow
def test_the_racing_benchmark_simulates_the_products_race_and_the_matched_fixed_confirmation(tmp_path):
    results, report, common = _smoke_dirs(tmp_path)
    harness.main([*common, "racing", "--simulations", "200"])
    result = json.loads((results / "racing.json").read_text())
    racing, fixed = result["designs"]["racing"], result["designs"]["fixed 3 seeds"]
    assert fixed["null"]["runs"] == 9 and 6 <= racing["null"]["runs"] < 24  # 2 challengers and the default
    assert racing["2 SD"]["claims"] > racing["1 SD"]["claims"] > racing["null"]["claims"]
    assert 2 <= result["matched_seeds"] <= 12 and result["racing_share"] == pytest.approx(
        result["racing_mean_runs"] / result["matched_runs"])
    _sections_rendered(report, "racing")


def test_the_label_free_benchmark_runs_at_a_smoke_size(tmp_path):
    results, report, common = _smoke_dirs(tmp_path)
    harness.main([*common, "label-free", "--methods", "twist", *[x for o in SMOKE for x in ("--set", o)]])
    assert json.loads((results / "label-free.json").read_text())["methods"]["twist"]["trials"] == 2
    _sections_rendered(report, "label-free")


@pytest.mark.slow
def test_the_efficiency_table_and_noise_benchmarks_run_at_a_smoke_size(tmp_path):
    """efficiency-table trains a grid; noise then trains a subgrid of it on fresh seeds."""
    results, report, common = _smoke_dirs(tmp_path)
    harness.main([*common, "efficiency-table", "--spec", str(_small_twist(tmp_path)), "--points", "2", "--processes",
                  "2", "--set", "training.epochs=1", "--set", "method.lam1=0.0", "--set", "method.lam2=1.0"])
    table = json.loads((results / "efficiency-table.json").read_text())
    assert len(table["points"]) == 4 and table["epochs"] == 1
    harness.main([*common, "noise", "--every", "1", "--seeds", "2", "--processes", "2"])
    # the subgrid starts at each axis's second value: 1 point of the 2 x 2 grid, on 2 fresh seeds
    assert len(json.loads((results / "noise-runs.json").read_text())["runs"]) == 2
    assert json.loads((results / "noise.json").read_text())["seeds"] == 2
    _sections_rendered(report, "efficiency-table", "noise")


# proxy: two pipelines of 2 two-epoch trials and 2 confirmation trials; warm-start: two searches of 2 trials.
PIPELINE_SMOKE = ["search.num_samples=2", "backbone.width=4", "evaluation.linear_probe=false", "training.batch_size=512",
                  "training.epochs=2", "data.subset=0.2"]


@pytest.mark.ray
@pytest.mark.slow
def test_the_proxy_benchmark_runs_at_a_smoke_size(tmp_path):
    results, report, common = _smoke_dirs(tmp_path)
    small = [*PIPELINE_SMOKE, "search.confirm.top_k=1", "search.confirm.seeds=2", "search.confirm.default=false"]
    harness.main([*common, "proxy", *[x for o in small for x in ("--set", o)], "--proxy", "data.subset=0.1",
                  "--proxy", "training.epochs=1"])
    proxy = json.loads((results / "proxy.json").read_text())
    assert proxy["confirm"] == "search.confirm.overrides={training.epochs: 2, data.subset: 0.2}"
    # the proxy's search: 2 trials of 1 epoch on a tenth of the images, against 2 of 2 epochs on a fifth of them
    assert proxy["search_compute_ratio"] == pytest.approx(0.25)
    # each confirmation: 2 runs of 2 epochs on 2,000 images, the proxy's trained or, same identity, reused
    pipeline = proxy["proxy_pipeline"]
    assert proxy["full"]["confirmation_image_epochs"] == 4 * 2000 and proxy["full"]["runs_reused"] == 0
    assert pipeline["confirmation_image_epochs"] + pipeline["reused_image_epochs"] == 4 * 2000
    assert proxy["winner_gap"]["seeds"] == 2 and 0 < proxy["compute_ratio"] < 1
    _sections_rendered(report, "proxy")


@pytest.mark.ray
@pytest.mark.slow
def test_the_warm_start_benchmark_runs_at_a_smoke_size(tmp_path):
    results, report, common = _smoke_dirs(tmp_path)
    harness.main([*common, "warm-start", *[x for o in PIPELINE_SMOKE for x in ("--set", o)]])  # (no confirmation)
    warm = json.loads((results / "warm-start.json").read_text())
    assert warm["observations"] == 2 and warm["epochs"]["cold"] >= 2 and warm["ratio"] >= 0
    _sections_rendered(report, "warm-start")
