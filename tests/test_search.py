"""`ssl-tune run` against a real local Ray instance and a real sqlite MLflow store (no mocks)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ssl_tune import load_backbone, tracking
from ssl_tune.data.datasets import load_dataset
from ssl_tune.data.loader import Normalizer
from ssl_tune.evaluation import extract_features, knn_accuracy
from ssl_tune.trials.runner import CHECKPOINTS_KEPT
from ssl_tune.trials.uploads import TAG_EXPORT_EPOCH
from tests.conftest import (CHROMIUM_INSTALL, ROOT, SEARCH_EPOCHS, SSL_TUNE, TEST_METHODS, cli_env, output, printed_command,
                            ray_started, require_system, run_cli, runs_of, search_spec, start_cli, wait_for)
from trainers import METHOD_PATH_ENV


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (Path(ROOT) / page).read_text(), flags=re.S)

EPOCHS = SEARCH_EPOCHS


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_holds_one_parent_with_nested_trials(finished_search):
    work, client, _ = finished_search
    experiment = client.get_experiment_by_name("search-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "search"]
    children = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "s1"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    for tag in ("ssl_tune.spec_hash", "ssl_tune.version", "ssl_tune.ray_address", "ssl_tune.git_commit"):
        assert tag in parent.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "trials.txt"} <= artifacts
    assert "best_loss" in parent.data.metrics and "best.method.lam2" in parent.data.params

    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert figures == {f"figures/{n}.png" for n in ("learning_curves", "optimization_history", "parallel_coordinates",
                                                     "slices", "param_importances")}
    importances = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance.")}
    assert set(importances) == {"importance.method.lam2", "importance.method.tau"}
    assert sum(importances.values()) == pytest.approx(1.0)

    statuses = sorted(tracking.trial_status(c) for c in children)
    assert statuses.count("stopped") >= 1 and statuses.count("finished") >= 1
    for child in children:
        params = child.data.params
        assert {"method.lam2", "method.tau", "training.epochs", "optimizer.lr"} <= set(params)
        history = client.get_metric_history(child.info.run_id, "loss")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))
        assert not {"training_iteration", "time_this_iter_s", "timestamp", "pid"} & set(child.data.metrics)
        figures = {a.path.removeprefix("figures/") for a in client.list_artifacts(child.info.run_id, "figures")}
        if child.info.status == "FINISHED":
            assert figures == {"loss_terms.png", "embedding.png", "knn_confusion.png"}
            assert len(steps) == EPOCHS
            assert {"linear_top1", "knn_top1", "knn_top1_random_init", "lr", "images_per_s"} <= set(child.data.metrics)
        else:
            assert figures == {"loss_terms.png"}  # no final embedding for a trial stopped early
            assert child.info.status == "KILLED"
            assert child.data.tags[tracking.TAG_STOPPED_AT] == str(len(steps)) and len(steps) < EPOCHS
            assert "linear_top1" not in child.data.metrics


@pytest.mark.ray
@pytest.mark.slow
def test_console_shows_the_trial_table_and_no_ray_output(finished_search):
    work, _, proc = finished_search
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Ray's own output: ") and next((work / "ssl_tune_runs").glob("s1-*.log")).stat().st_size > 0
    assert lines[1] == "resources.gpus_per_worker: auto -> 0 (no node has a GPU)"
    assert lines[2].split()[:6] == ["trial", "status", "method.lam2", "method.tau", "epoch", "loss"]
    assert sum(" finished " in line for line in lines) >= 1 and sum(" stopped " in line for line in lines) >= 1
    for marker in ("(run_trial pid=", "Trial status", "INFO", "WARNING", "╭", "ray."):
        assert marker not in proc.stdout and marker not in proc.stderr, marker


@pytest.mark.ray
@pytest.mark.slow
def test_results_leaderboard_and_parquet(finished_search, cli_here):
    import pyarrow.parquet as pq

    work, _, proc = finished_search
    assert "search finished: 3 trials" in proc.stdout
    status, _, err = cli_here("results", "search-test", "--out", "trials.parquet", cwd=work)
    assert status == 0, err
    table = pq.read_table(work / "trials.parquet").to_pylist()
    assert [row["rank"] for row in table] == [1, 2, 3]
    objectives = [row["objective"] for row in table]
    assert objectives == sorted(objectives)  # mode min: best first
    assert {"method.lam2", "method.tau", "status", "epochs", "duration_s"} <= set(table[0])
    assert table[0]["method.lam2"] == 2.0


@pytest.mark.ray
@pytest.mark.slow
def test_export_reloads_the_backbone_with_its_preprocessing_and_reproduces_logged_knn(finished_search, cli_here):
    work, client, proc = finished_search
    # the search's last lines: commands that run as printed
    assert printed_command(proc.stdout, "export the best backbone:") == ["export", "s1"]  # its name, unique
    assert printed_command(proc.stdout, "browse the search:") == ["ui"]
    # one export folder story: the hint loads what `ssl-tune export NAME` writes by default
    assert "then load it in Python:    backbone, preprocess = ssl_tune.load_backbone('exports/s1')" in proc.stdout
    hint = next(line for line in proc.stdout.splitlines() if line.startswith("export the best backbone:"))
    pasted = subprocess.run(hint.split(":", 1)[1] + " --out pasted", shell=True, cwd=work, capture_output=True,
                            text=True, env=cli_env())
    assert pasted.returncode == 0 and (work / "pasted" / "backbone.pt").is_file(), pasted.stderr

    status, _, err = cli_here("export", "search-test", "--out", "exported", "--register", "test-backbone", cwd=work)
    assert status == 0, err
    exported = work / "exported"
    assert set(p.name for p in exported.iterdir()) >= {"backbone.pt", "head.pt", "spec.yaml", "input.json", "metrics.json"}
    torch.load(exported / "backbone.pt", weights_only=True)
    info = json.loads((exported / "metrics.json").read_text())
    logged = {m.step: m.value for m in client.get_metric_history(info["run_id"], "knn_top1")}[info["epoch"]]

    backbone, preprocess = load_backbone(exported)
    data = load_dataset("fashion_mnist_subset")
    norm = Normalizer(data.train_images)
    # the input contract written at export is the trainer's normalisation of its data
    contract = json.loads((exported / "input.json").read_text())
    assert contract == {"channels": 1, "image_size": 28, "mean": pytest.approx(norm.mean.flatten().tolist()),
                        "std": pytest.approx(norm.std.flatten().tolist()), "dataset": "fashion_mnist_subset"}
    assert torch.allclose(preprocess(data.test_images), norm.uint8(data.test_images), atol=1e-6)
    feats = [extract_features(backbone, x, norm, device=torch.device("cpu")) for x in (data.train_images, data.test_images)]
    top1, _ = knn_accuracy(feats[0], data.train_labels, feats[1], data.test_labels, num_classes=10)
    assert abs(top1 - logged) <= 0.5
    # the same backbone and preprocessing straight from MLflow: by the search's experiment name, and as
    # the registered model
    from_run = load_backbone("search-test", tracking_uri=f"sqlite:///{work}/mlflow.db")
    registered = load_backbone("models:/test-backbone/1", tracking_uri=f"sqlite:///{work}/mlflow.db")
    for a, b, c in zip(backbone.state_dict().values(), from_run.backbone.state_dict().values(),
                       registered.backbone.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert preprocess.contract == from_run.preprocess.contract == registered.preprocess.contract
    # Registering and loading a registered model point MLflow's fluent API at the store for that call only: the
    # caller's tracking URI, which every process it starts inherits, is left as it was (unset here).
    assert "MLFLOW_TRACKING_URI" not in os.environ
    import mlflow

    assert not mlflow.is_tracking_uri_set()

    # the README's and the docs' examples, as written, next to this export (as `ssl-tune export NAME` writes it)
    (work / "docs" / "images").mkdir(parents=True)
    shutil.copy(Path(ROOT) / "docs" / "images" / "trouser.png", work / "docs" / "images")
    width = backbone(preprocess(data.test_images[:1])).shape[1]
    for page, name in (("README.md", "first"), ("docs/first-search.md", "twist")):
        example = next(block for block in python_blocks(page) if f'load_backbone("exports/{name}")' in block)
        (work / "exports").mkdir(exist_ok=True)
        (work / "exports" / name).symlink_to(exported)
        ran = subprocess.run([sys.executable, "-c", textwrap.dedent(example)], cwd=work, capture_output=True, text=True,
                             timeout=120)  # (dedented: the README's block sits in a list item)
        assert ran.returncode == 0, (page, ran.stderr)
        assert f"torch.Size([1, {width}])" in ran.stdout and "grey 28x28" in ran.stdout, page


@pytest.mark.ray
@pytest.mark.slow
def test_knn_bank_benchmark_scores_every_trial_checkpoint_with_each_bank(finished_search):
    from benchmarks import knn_bank

    work, client, _ = finished_search
    rows = knn_bank.trial_accuracies(client, tracking.find_parent_run(client, "s1"), [50, 500])
    finished = [r for r in client.search_runs([client.get_experiment_by_name("search-test").experiment_id])
                if r.data.tags.get(tracking.TAG_KIND) == "trial" and tracking.TAG_CHECKPOINT in r.data.tags]
    assert len(rows) == len(finished) == 3
    for row in rows:
        assert {"10000", "50", "500"} <= set(row) and row["classes"] == 10
        # The whole split as the bank is what the trial logged at that epoch (bank_size's default covers it).
        assert row["10000"] == pytest.approx(row["logged_knn_top1"], abs=0.051)


@pytest.mark.ray
@pytest.mark.slow
def test_one_definition_of_best_console_leaderboard_parent_optuna_and_export_agree(finished_search, cli_here):
    """A trial's objective is its last evaluated epoch's value (ssl_tune.searching.space): every view of the
    best trial shows that one number, and export writes the checkpoint it was measured on."""
    import pickle

    work, client, proc = finished_search
    _, (parent,), _ = runs_of(work)
    rows = tracking.leaderboard(client, parent)
    best = rows[0]
    run = client.get_run(best["run_id"])
    last_epoch = max(m.step for m in client.get_metric_history(best["run_id"], "loss"))
    assert best["objective"] == run.data.metrics["loss"] == parent.data.metrics["best_loss"]
    assert run.data.tags[tracking.TAG_CHECKPOINT_EPOCH] == str(last_epoch)
    # the console's "best" column after the last trial event
    events = [line.split() for line in proc.stdout.splitlines() if line.split()[1:2] in (["finished"], ["stopped"])]
    assert events[-1][6] == f"{best['objective']:.4g}"
    # Optuna's study, as the searcher saved it in the experiment directory
    (state,) = (work / "ssl_tune_runs").glob("s1-*/searcher-state-*.pkl")
    study = pickle.loads(state.read_bytes())["_ot_study"]
    assert sorted(t.value for t in study.trials) == sorted(r["objective"] for r in rows)
    assert study.best_value == best["objective"]
    # export: the same run, its last evaluated epoch, the same number
    status, _, err = cli_here("export", "s1", "--out", "exported-best", cwd=work)
    assert status == 0, err
    info = json.loads((work / "exported-best" / "metrics.json").read_text())
    assert (info["run_id"], info["epoch"], info["metrics"]["loss"]) == (best["run_id"], last_epoch, best["objective"])


@pytest.mark.ray
@pytest.mark.slow
def test_export_and_load_from_mlflow_alone_after_rays_storage_is_gone(finished_search, tmp_path, cli_here):
    """Every trial that came through has its best checkpoint among its run's artifacts, so the winner
    is exported from anywhere that reaches the tracking store, without Ray's storage."""
    work, client, _ = finished_search
    uri = f"sqlite:///{work}/mlflow.db"
    _, _, children = runs_of(work)
    came_through = [c for c in children if c.info.status in ("FINISHED", "KILLED")]
    assert came_through
    for child in came_through:  # the trial's own upload: the export of its objective's epoch, no optimizer state
        assert child.data.tags.get(tracking.TAG_CHECKPOINT_ARTIFACT) == "export"
        assert child.data.tags[TAG_EXPORT_EPOCH] == child.data.tags[tracking.TAG_CHECKPOINT_EPOCH]
        uploaded = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "export")}
        assert uploaded == {"backbone.pt", "head.pt", "spec.yaml", "input.json", "metrics.json"}
        assert not [a for a in client.list_artifacts(child.info.run_id) if a.path.startswith("checkpoint")]
        # MLflow's system metrics, sampled in the trial's own process
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(child.data.metrics)
    local = load_backbone("search-test", tracking_uri=uri).backbone  # from Ray's storage
    (work / "ssl_tune_runs").rename(work / "ssl_tune_runs.moved")
    try:
        status, _, err = cli_here("export", "search-test", "--tracking-uri", uri, "--out", str(tmp_path / "out"))
        assert status == 0, err
        assert not (tmp_path / "mlflow.db").exists()
        exported = load_backbone(tmp_path / "out").backbone
        from_artifacts = load_backbone("search-test", tracking_uri=uri).backbone
        for a, b, c in zip(local.state_dict().values(), exported.state_dict().values(), from_artifacts.state_dict().values()):
            assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        (work / "ssl_tune_runs.moved").rename(work / "ssl_tune_runs")


def test_read_only_commands_name_the_store_and_never_create_one(tmp_path, cli_here):
    for args in (["results", "search-test"], ["export", "search-test"], ["list"]):
        status, _, err = cli_here(*args)
        assert status == 2 and f"no MLflow tracking store at sqlite:///{tmp_path}/mlflow.db" in err, args
    assert not list(tmp_path.iterdir())


@pytest.mark.ray
@pytest.mark.slow
def test_list_shows_the_search(finished_search, cli_here):
    work, _, _ = finished_search
    status, out, err = cli_here("list", cwd=work)
    assert status == 0, err
    header, row = out.splitlines()[1:3]
    assert header.split()[:5] == ["search", "experiment", "started", "method", "trials"]
    assert row.split()[0] == "s1" and row.split()[4] == "twist" and row.split()[5] == "3" and "FINISHED" in row


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_trial_runs_ddp_through_ray_train(tmp_path):
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
    raw["training"]["epochs"] = 4
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.5}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "spec.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, _, (child,) = runs_of(tmp_path)
    assert child.info.status == "FINISHED" and "knn_top1" in child.data.metrics
    checkpoint = Path(child.data.tags[tracking.TAG_CHECKPOINT])
    assert torch.load(checkpoint / "checkpoint.pt", weights_only=True)["epoch"] == 4
    # Ray Train keeps as many as a one-worker trial: the latest and the one before it.
    assert len([p for p in checkpoint.parent.glob("checkpoint_*") if p.is_dir()]) == CHECKPOINTS_KEPT
    assert checkpoint.is_relative_to(tmp_path / "ssl_tune_runs")  # in the storage path, not Ray's session directory


def test_infeasible_trial_resources_fail_fast(tmp_path, cli_here):
    raw = search_spec()
    raw["resources"] = {"num_workers": 64, "cpus_per_worker": 1}
    raw["training"]["batch_size"] = 512  # divisible by the workers: the resources are what is wrong
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    status, _, err = cli_here("run", "spec.yaml")
    assert status == 2
    assert "resources" in err and "64 worker(s)" in err and "Traceback" not in err
    assert not ray_started()  # refused before Ray started


@pytest.mark.ray
@pytest.mark.slow
def test_diverged_trial_is_failed_with_its_reason_and_the_search_goes_on(tmp_path):
    # Also: a kNN objective evaluated every 2nd epoch (and the last); the epochs between carry no objective.
    raw = search_spec(num_samples=2, scheduler="none", metric="knn_top1", mode="max",
                      points_to_evaluate=[{"optimizer.lr": 1e12}, {"optimizer.lr": 0.3}])
    raw["optimizer"] = {"name": "sgd", "lr": {"type": "choice", "values": [1e12, 0.3]}, "momentum": 0.0, "warmup_epochs": 0}
    raw["training"]["epochs"], raw["evaluation"]["eval_every"] = 3, 2
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "spec.yaml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, (parent,), trials = runs_of(tmp_path)
    children = {r.data.params["optimizer.lr"]: r for r in trials}
    diverged, healthy = children["1000000000000.0"], children["0.3"]
    assert diverged.info.status == "FAILED" and tracking.TAG_RESTARTS not in diverged.data.tags  # not retried
    assert diverged.data.tags[tracking.TAG_ERROR].startswith("diverged: non-finite loss in epoch 1")
    assert proc.stdout.count("failed: diverged: non-finite loss in epoch 1") == 1  # on the console too
    assert healthy.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(healthy.info.run_id, "knn_top1")] == [2, 3]
    assert [m.step for m in client.get_metric_history(healthy.info.run_id, "loss")] == [1, 2, 3]
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.TAG_BEST_TRIAL_RUN] == healthy.info.run_id


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("workers, stage, advice", [(1, "evaluation", "lower evaluation.batch_size"),
                                                    (2, "training step", "lower training.batch_size")])
def test_trial_out_of_device_memory_fails_once_naming_the_stage_without_restarts(tmp_path, workers, stage, advice):
    """The device's error raised by a method of the tests (`tests/methods/twist_oom.py`) in its Ray workers."""
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[], max_failures=2)
    raw["method"] = {**raw["method"], "name": "twist_oom", "oom_in": stage}
    raw["resources"] = {"num_workers": workers, "cpus_per_worker": 1 / workers}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([SSL_TUNE, "run", "spec.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**cli_env(), METHOD_PATH_ENV: TEST_METHODS})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]  # its only trial failed
    assert f"failed: out of device memory during the {stage}" in proc.stdout and "error: every trial failed" in proc.stderr
    _, (parent,), (child,) = runs_of(tmp_path)
    assert parent.info.status == "FAILED"
    assert child.info.status == "FAILED" and tracking.TAG_RESTARTS not in child.data.tags  # not retried
    assert child.data.tags[tracking.TAG_ERROR].startswith(
        f"out of device memory during the {stage} on cpu (training.batch_size 500, {500 // workers} per worker")
    assert advice in child.data.tags[tracking.TAG_ERROR]


def test_a_ranks_out_of_memory_is_recognised_by_its_type_in_ray_trains_error():
    """What `TorchTrainer.fit` raises when a rank fails: Ray Train's own error, each rank's exception wrapped
    with its traceback. A message that merely mentions memory is not taken for it."""
    import pickle

    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from ssl_tune.trials.runner import rank_failure
    from trainers.loop import DeviceOutOfMemory

    oom = DeviceOutOfMemory("out of device memory during the training step on cuda:0 (...): lower training.batch_size")
    error = WorkerGroupError("training failed", {0: UserExceptionWithTraceback(ValueError("rank 0"), "tb0"),
                                                 1: UserExceptionWithTraceback(oom, "tb1")})
    found = rank_failure(pickle.loads(pickle.dumps(error)), DeviceOutOfMemory)  # it crossed from the workers
    assert isinstance(found, DeviceOutOfMemory) and str(found) == str(oom)
    quoted = WorkerGroupError(f"training failed: {oom}", {0: UserExceptionWithTraceback(RuntimeError(str(oom)), "tb")})
    assert rank_failure(quoted, DeviceOutOfMemory) is None and rank_failure(ValueError(str(oom)), DeviceOutOfMemory) is None


def test_batch_larger_than_the_data_is_exit_2_before_any_trial(tmp_path, cli_here):
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
    raw["training"]["batch_size"] = 20000  # more than the bundled data
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    status, out, err = cli_here("run", "spec.yaml")
    assert status == 2, out[-3000:] + err[-3000:]
    assert "training.batch_size (20000) is larger than data set" in err and "Traceback" not in err
    assert not ray_started()  # refused before Ray started
    assert not list(tmp_path.glob("ssl_tune_runs/**/run_trial_*"))  # no trial started


@pytest.mark.ray
@pytest.mark.slow
def test_trial_that_errors_is_failed_with_its_error(tmp_path):
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[], max_failures=0)
    raw["training"]["epochs"] = 3
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = start_cli(["run", "spec.yaml", "--name", "r"], cwd=tmp_path)
    first = wait_for(lambda: next((p.read_text().splitlines()[0] for p in (tmp_path / "ssl_tune_runs").glob(
        "r-*/run_trial_*/result.json") if p.read_text().strip()), None), 240, "the first epoch", proc)
    os.kill(json.loads(first)["pid"], 9)  # the trial's process dies, and no restart is allowed: the trial errors
    proc.wait(timeout=300)
    out = output(proc)
    assert proc.returncode == 3, out[-4000:]  # its only trial failed
    client, (parent,), (child,) = runs_of(tmp_path)
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    error = child.data.tags[tracking.TAG_ERROR]
    assert "ActorDiedError" in error or "died" in error, error
    assert f"failed: {error[:40]}" in out  # the reason on the console too
    text = Path(client.download_artifacts(child.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "The actor died unexpectedly" in text and "\x1b[" not in text  # Tune's error file, without colour codes


# --- the MLflow UI in a real browser -----------------------------------------------------------


def chromium() -> str:
    """Debian's chromium: `.ci/run` installs it; elsewhere the browser test skips without it."""
    found = shutil.which("chromium")
    require_system(found is not None, "Chromium (headless, for the browser test)", CHROMIUM_INSTALL)
    return found


def browse(url: str, *, screenshot: Path | None = None, height: int = 1000) -> str:
    """The page's text after its scripts ran (headless Chromium), optionally a screenshot too."""
    # Virtual time lets the page's fetches and charts finish before the DOM or the picture is taken.
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--window-size=1400,{height}", "--virtual-time-budget=60000", "--run-all-compositor-stages-before-draw"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)[^>]*>.*?</\1>", "", dom, flags=re.S))
    return re.sub(r"\s+", " ", text) + ("\nPLOTLY-CHART" if "plotly" in dom else "")


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_mlflow_ui_in_a_browser_shows_the_search_its_trials_and_their_knn_curves(finished_search, tmp_path):
    import socket
    import time
    import urllib.request

    chromium()  # skips here, before the UI starts, where it is missing outside CI
    work, client, _ = finished_search
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui_log = tmp_path / "ui.log"
    ui = subprocess.Popen([SSL_TUNE, "ui", "--port", str(port), "--tracking-uri", f"sqlite:///{work}/mlflow.db"],
                          cwd=work, stdout=ui_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "the MLflow UI did not start"
                time.sleep(1)
        experiment = client.get_experiment_by_name("search-test").experiment_id
        parent = tracking.find_parent_run(client, "search-test")
        finished = next(c for c in tracking.child_runs(client, parent) if c.info.status == "FINISHED")
        base = f"http://127.0.0.1:{port}/#/experiments/{experiment}"

        runs_page = browse(f"{base}/runs")
        # The parent is listed; its 3 trials are nested under it (counted, not listed at the top level).
        assert " s1 " in runs_page and "4 matching runs" in runs_page and "trial-" not in runs_page
        trial_page = browse(f"{base}/runs/{finished.info.run_id}")
        assert "Parent run s1" in trial_page and "ssl_tune.kind : trial" in trial_page
        shot = tmp_path / "mlflow_trial_metrics.png"
        # MLflow draws only the charts in view, in name order: knn_top1 is the 7th of 14
        metrics_page = browse(f"{base}/runs/{finished.info.run_id}/model-metrics", screenshot=shot, height=1600)
        assert f"{finished.info.run_name} (knn_top1)" in metrics_page and "PLOTLY-CHART" in metrics_page
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("SSL_TUNE_SCREENSHOT_TO"):  # how docs/images/mlflow_trial_metrics.png was made
            Path(os.environ["SSL_TUNE_SCREENSHOT_TO"]).write_bytes(shot.read_bytes())
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    log = ui_log.read_text()
    assert f"at http://127.0.0.1:{port}" in log and "Warning" not in log, log[-3000:]  # no deprecation noise
