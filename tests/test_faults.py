"""Faults: a dead worker, an interrupted or killed driver and `ssl-tune resume`, a multi-node
cluster, unreachable tracking, infeasible resources. Real Ray, real MLflow (sqlite), no mocks of
either; the tracking-outage test wraps a real client."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_tune import tracking
from ssl_tune.cluster import check_cluster_paths, check_resources
from ssl_tune.spec import SpecError
from ssl_tune.spec.files import spec_from_dict
from ssl_tune.storage_path import StoragePath
from ssl_tune.trials.runner import RESTORED_FROM_KEY, RESTORED_HISTORY_KEY
from tests.conftest import (FAULT_SUBSET, FakeTrial, epoch_steps, output, printed_command, ray_started, run_cli,
                            runs_of, search_spec, slow_search_spec, start_cli, tiny_spec_dict, wait_for)



# --- before any trial -------------------------------------------------------------------------


def test_unreachable_tracking_server_exits_2_before_any_trial(tmp_path, cli_here):
    raw = search_spec()
    raw["mlflow"] = {"tracking_uri": "http://127.0.0.1:9"}  # the discard port: nothing listens
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    start = time.time()
    status, _, err = cli_here("run", "spec.yaml")  # in-process: the check comes before Ray
    assert status == 2 and "cannot reach the MLflow tracking server at http://127.0.0.1:9" in err
    assert time.time() - start < 60
    assert not (tmp_path / "ssl_tune_runs").exists()


def nodes(*cpus):
    return [{"id": str(i), "address": f"10.0.0.{i}", "CPU": float(c), "GPU": 0.0} for i, c in enumerate(cpus)]


def test_each_worker_must_fit_on_one_node():
    raw = tiny_spec_dict(resources={"num_workers": 2, "cpus_per_worker": 3})
    raw["training"]["batch_size"] = 32
    spec = spec_from_dict(raw)
    # 4 CPUs in all, but no node has the 3 one worker needs.
    with pytest.raises(SpecError, match=r"2 worker\(s\) x \(3 CPU, 0 GPU\), each worker on one node.*10.0.0.0: 2 CPU"):
        check_resources(spec, nodes(2, 2))
    assert check_resources(spec, nodes(4, 3, 3)) == 1  # 3 worker slots: one trial at a time
    single = spec_from_dict(tiny_spec_dict(resources={"num_workers": 1, "cpus_per_worker": 2}))
    assert check_resources(single, nodes(4, 3)) == 3


def test_a_file_tracking_store_is_refused_behind_a_ray_client(tmp_path):
    with pytest.raises(SpecError, match=r"mlflow.tracking_uri: sqlite:///x.db is a file on this machine.*ray://head:10001"):
        check_cluster_paths(StoragePath.of(tmp_path), "sqlite:///x.db", "ray://head:10001", nodes(2))
    check_cluster_paths(StoragePath.of(tmp_path), "http://mlflow:5000", "local", nodes(2))  # one local machine: fine


def _open_store_at_the_barrier(uri: str, barrier) -> None:
    barrier.wait()
    tracking.client_for(uri).search_experiments(max_results=1)


def test_processes_opening_a_new_sqlite_store_at_once_all_get_one_whole_store(tmp_path):
    """MLflow builds a new sqlite store's tables in place: a second process opening it meanwhile (a test polling a
    search that is starting, `ssl-tune results` beside `ssl-tune run`) built them again and one failed with "table
    ... already exists". Two processes, released at once, both open a store that does not exist yet."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    context = multiprocessing.get_context("fork")  # mlflow already imported: both start within milliseconds
    barrier = context.Barrier(2)
    procs = [context.Process(target=_open_store_at_the_barrier, args=(uri, barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert [e.name for e in tracking.client_for(uri).search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # no scratch store left behind


def test_a_search_saved_by_an_earlier_version_restores_its_tune_state():
    """Tune pickles a search's callbacks, searcher and spec classes by module path (tuner.pkl, the searcher's
    state). Those of a search saved at b86332d, before ssl_tune/spec/ and the subpackages, load: a search
    interrupted before an upgrade resumes after it (`ssl_tune.moved_modules`)."""
    import pickle

    from ssl_tune.searching import stage
    from ssl_tune.report.console import ConsoleTable
    from ssl_tune.searching.space import SearchSpace
    from ssl_tune.searching.stopping import StopWhenStorageFull

    saved = Path(__file__).parent / "data" / "saved_at_b86332d"
    state = pickle.loads((saved / "tuner.pkl").read_bytes())
    logger, stop, console = state["_run_config"].callbacks
    assert (type(logger), type(stop), type(console)) == (tracking.MlflowTrialLogger, StopWhenStorageFull, ConsoleTable)
    assert state["_tune_config"].trial_dirname_creator is stage.search_dirname
    stop.setup()
    stop.on_trial_result(0, [], None, {"epoch": 1.0})  # (an epoch, not a full disk: nothing to do)
    assert stop.storage is None and not stop.stopping
    searcher = pickle.loads((saved / "searcher-state.pkl").read_bytes())
    assert isinstance(searcher["_space"], SearchSpace) and searcher["_ot_study"].trials
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        import ssl_tune.searching.driver

        ssl_tune.searching.driver.no_such_name  # noqa: B018  (only the names that moved are found)


def test_a_new_sqlite_store_is_created_whole_where_hard_links_are_refused(tmp_path, monkeypatch):
    """Some network and FUSE file systems refuse hard links: the private store is then moved into place."""
    def refuse(source, destination):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert [e.name for e in tracking.client_for(uri).search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


# --- a worker dies -----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(slow_search_spec(num_samples=1, epochs=4)))
    proc = start_cli(["run", "spec.yaml", "--name", "w"], cwd=tmp_path)
    try:
        result_file = wait_for(lambda: next((p for p in (tmp_path / "ssl_tune_runs").glob("w-*/run_trial_*/result.json")
                                             if p.read_text().strip()), None), 240, "the first epoch", proc)
        first = json.loads(result_file.read_text().splitlines()[0])
        os.kill(first["pid"], signal.SIGKILL)  # the trial's process, in the middle of epoch 2
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output(proc)[-4000:]
    client, parents, children = runs_of(tmp_path)
    (child,) = children
    assert child.info.status == "FINISHED" and parents[0].info.status == "FINISHED"
    assert child.data.tags[tracking.TAG_RESTARTS] == "1"
    assert epoch_steps(client, child) == [1, 2, 3, 4]  # every epoch once: none lost, none logged twice
    results = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert len({r["pid"] for r in results}) == 2  # a new process finished the trial
    (restored,) = [r for r in results if RESTORED_FROM_KEY in r]  # sent once, with what the checkpoint holds
    assert [h["epoch"] for h in json.loads(restored[RESTORED_HISTORY_KEY])] == list(range(1, int(restored[RESTORED_FROM_KEY]) + 1))


# --- the driver stops -------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_killed_and_terminated_driver_then_resume_finishes_every_trial_once(tmp_path):
    """Ctrl-C, SIGKILL of the whole driver, then SIGTERM in the last round, each followed by a resume. In the
    last round every trial has started: Tune marks the running one TERMINATED like a finished one, so counting
    trials took the search for finished (exit 0, parent FINISHED, resume refused)."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(slow_search_spec(num_samples=3, epochs=4)))

    def children():
        return runs_of(tmp_path)[2]

    def finished() -> int:
        return sum(c.info.status == "FINISHED" for c in children())

    def stopped_cleanly(proc, finished_trials: int):
        """The driver stopped on a signal: exit 130, the parent and the stopped trial closed as KILLED, a resume hint."""
        proc.wait(timeout=120)
        out = output(proc)
        assert proc.returncode == 130, out[-4000:]
        assert f"search interrupted after {finished_trials} finished trial(s)" in out, out[-3000:]
        _, (parent,), runs = runs_of(tmp_path)
        assert parent.info.status == "KILLED"
        assert "RUNNING" not in {c.info.status for c in runs}
        (stopped,) = [c for c in runs if c.info.status == "KILLED"]
        assert tracking.TAG_INTERRUPTED_AT in stopped.data.tags and tracking.TAG_STOPPED_AT not in stopped.data.tags
        assert printed_command(out, "resume with:") == ["resume", parent.info.run_id]
        return parent, stopped

    # 1. Ctrl-C (SIGINT) while the second trial runs: a clean stop, runs closed, a resume hint.
    proc = start_cli(["run", "spec.yaml", "--name", "d"], cwd=tmp_path)
    wait_for(lambda: finished() == 1 and any(c.info.status == "RUNNING" and c.data.metrics.get("epoch", 0) >= 1
                                             for c in children()), 300, "one finished and one running trial", proc)
    os.kill(proc.pid, signal.SIGINT)
    stopped_cleanly(proc, 1)

    # 2. resume by the name given to `run`; SIGKILL the whole driver (and its local Ray) once the second trial
    # has finished and the third and last is past its first epoch.
    proc = start_cli(["resume", "d"], cwd=tmp_path)
    wait_for(lambda: finished() == 2 and any(c.info.status == "RUNNING" and c.data.metrics.get("epoch", 0) >= 1
                                             for c in children()), 300, "progress after resuming", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _, (parent,), _ = runs_of(tmp_path)
    assert parent.info.status == "RUNNING"  # nobody closed it: the driver died

    # 3. resume by the experiment's name (its one unfinished search); SIGTERM once the last trial has reported an
    # epoch to this driver (from scratch or from its checkpoint: Tune's state may predate the kill): the last round.
    proc = start_cli(["resume", "search-test"], cwd=tmp_path)
    wait_for(lambda: re.search(r" running .* [1-3]/4 ", output(proc)), 300, "the last trial running again", proc)
    os.kill(proc.pid, signal.SIGTERM)
    parent, stopped = stopped_cleanly(proc, 2)

    # 4. resume by the printed run id: everything finishes, every epoch logged once.
    proc = run_cli(["resume", parent.info.run_id], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "search finished: 3 trials" in proc.stdout
    client, (parent,), runs = runs_of(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["ssl_tune.resumed"] == "3"
    assert len(runs) == 3 and len({c.data.tags[tracking.TAG_TRIAL_ID] for c in runs}) == 3
    assert {c.info.status for c in runs} == {"FINISHED"}
    for child in runs:
        assert epoch_steps(client, child) == [1, 2, 3, 4], child.data.tags[tracking.TAG_TRIAL_ID]
    sampled = {(c.data.params["method.lam2"], c.data.params["method.tau"]) for c in runs}
    assert len(sampled) == 3  # the Optuna study went on: no point repeated, none lost
    assert client.get_run(stopped.info.run_id).data.metrics[RESTORED_FROM_KEY] >= 1  # from its checkpoint


# --- tracking goes away mid-search ------------------------------------------------------------


class FlakyClient:
    """A real MlflowClient whose calls fail while `down` is set, like a server that went away."""

    def __init__(self, client):
        self.client, self.down, self.refused = client, False, 0

    def __getattr__(self, name):
        attr = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                self.refused += 1
                raise ConnectionError("connection refused")
            return attr(*args, **kwargs)

        return call


def trial_logger(tmp_path, epochs):
    """A search's parent run in a fresh sqlite store, and the MLflow callback that logs its trials."""
    spec = spec_from_dict({**tiny_spec_dict(training={"epochs": epochs, "batch_size": 32, "seed": 0}),
                           "search": {"metric": "loss", "mode": "min"}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    experiment = client.create_experiment("search")
    parent = client.create_run(experiment, tags={tracking.TAG_KIND: "search"}).info.run_id
    return client, experiment, tracking.MlflowTrialLogger(uri, experiment, parent, spec)


def only_trial_run(client, experiment):
    (child,) = [r for r in client.search_runs([experiment]) if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    return child


def test_metrics_logged_while_tracking_is_down_are_written_in_order_when_it_returns(tmp_path, capfd):
    real, experiment, logger = trial_logger(tmp_path, epochs=3)
    flaky = FlakyClient(real)
    logger._writer = tracking.MlflowWriter(logger.uri, lambda: flaky, retry_s=0.1)
    trial = FakeTrial("t1", {})
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1.0, "loss": 3.0})
    assert logger.writer.drain(timeout=30)
    flaky.down = True
    started = time.monotonic()
    for epoch in (2, 3):
        logger.on_trial_result(0, [], trial, {"epoch": float(epoch), "loss": 3.0 - epoch})
    logger.on_trial_complete(0, [], trial)
    assert time.monotonic() - started < 0.5  # the callback only queues: it never waits for the server
    wait_for(lambda: flaky.refused >= 1, 30, "the writer's first try while the server is down")
    assert logger.writer.pending >= 3  # held, not dropped
    flaky.down = False
    logger.on_experiment_end([])
    err = capfd.readouterr().err  # the console's stderr, not Ray's log
    assert err.count("is unreachable") == 1 and err.count("reachable again") == 1, err
    child = only_trial_run(real, experiment)
    assert [(m.step, m.value) for m in real.get_metric_history(child.info.run_id, "loss")] == [(1, 3.0), (2, 1.0), (3, 0.0)]
    assert child.info.status == "FINISHED"


def test_the_searchs_figures_are_drawn_as_a_trial_ends_at_most_once_a_minute(tmp_path, monkeypatch):
    """Trials of seconds would have the driver draw the search's figures again and again; the end of the
    search (`close_search_run`) always draws them."""
    from ssl_tune.tracking import trial_logger as module

    drawn, draw = [], module.log_search_figures
    monkeypatch.setattr(module, "log_search_figures", lambda *args: drawn.append(draw(*args)))
    client, _, logger = trial_logger(tmp_path, epochs=1)

    def trial_ends(trial_id) -> int:
        trial = FakeTrial(trial_id, {})
        logger.on_trial_start(0, [], trial)
        logger.on_trial_result(0, [], trial, {"epoch": 1.0, "loss": 1.0})
        logger.on_trial_complete(0, [], trial)
        assert logger.writer.drain(timeout=30)
        return len(drawn)

    assert trial_ends("t1") == 0  # the search started less than a minute ago
    logger._search_figures_at -= module.SEARCH_FIGURES_EVERY_S  # a minute later
    assert trial_ends("t2") == 1
    assert "figures/learning_curves.png" in {a.path for a in client.list_artifacts(logger.parent_run_id, "figures")}
    assert trial_ends("t3") == 1  # within a minute of the last drawing


def test_epochs_whose_results_died_with_their_node_are_logged_from_the_restored_checkpoint(tmp_path):
    """Ray Train persists epoch 3's checkpoint, then the node dies before epoch 3's metrics reach Tune:
    the restarted trial continues from epoch 3, and its first result carries the checkpoint's history.
    The same for the last epoch, which the restored trial sends again with its checkpoint."""
    client, experiment, logger = trial_logger(tmp_path, epochs=5)
    trial = FakeTrial("t1", {})
    history = [{"epoch": float(e), "loss": 10.0 - e} for e in range(1, 6)]
    logger.on_trial_start(0, [], trial)
    for entry in history[:2]:
        logger.on_trial_result(0, [], trial, entry)
    logger.on_trial_recover(0, [], trial)
    # Restored from epoch 3, which MLflow never saw; the history repeats epochs 1 and 2, which it did.
    logger.on_trial_result(0, [], trial, {**history[3], RESTORED_FROM_KEY: 3.0, RESTORED_HISTORY_KEY: json.dumps(history[:3])})
    # A second loss: restored from epoch 3 again when MLflow has 4 (one epoch trained twice).
    logger.on_trial_recover(0, [], trial)
    logger.on_trial_result(0, [], trial, {**history[3], RESTORED_FROM_KEY: 3.0, RESTORED_HISTORY_KEY: json.dumps(history[:3])})
    # The last epoch, sent again by a trial restored from its checkpoint (its first sending was lost).
    last = {**history[4], RESTORED_FROM_KEY: 5.0, RESTORED_HISTORY_KEY: json.dumps(history), "checkpoint_path": "/c/5"}
    logger.on_trial_result(0, [], trial, last)
    trial.last_result = last
    logger.on_trial_complete(0, [], trial)
    logger.on_experiment_end([])
    child = only_trial_run(client, experiment)
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")] == [
        (e, 10.0 - e) for e in range(1, 6)]  # every epoch once
    assert child.data.tags[tracking.TAG_EPOCHS_LOST] == "1" and child.data.tags[tracking.TAG_RESTARTS] == "2"
    assert (child.data.tags[tracking.TAG_CHECKPOINT], child.data.tags[tracking.TAG_CHECKPOINT_EPOCH]) == ("/c/5", "5")
    assert child.info.status == "FINISHED"


def test_a_trial_restored_from_its_last_epoch_reports_that_epoch_again_with_its_checkpoint(tmp_path, monkeypatch):
    """The node died after Ray Train persisted the last epoch's checkpoint but before its result reached
    Tune: the restarted trial has nothing left to train, and sends that epoch (metrics, history,
    checkpoint and final evaluation) instead of ending without a result."""
    import ray.tune

    from ssl_tune.data.cache import open_dataset
    from ssl_tune.evaluation import EVALUATION_FILE, load_arrays
    from ssl_tune.trials.runner import train_worker
    from ssl_tune.trials.checkpoints import RECORD_FILE
    from trainers.loop import CHECKPOINT_FILE, Reporter, Trainer

    spec = spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32, "seed": 0}))

    class Saver(Reporter):
        def on_epoch(self, metrics, write_checkpoint):
            write_checkpoint(tmp_path / "last")

    Trainer(spec, dataset=open_dataset(spec.data)[0]).fit(Saver())
    reports = []

    def report(metrics, checkpoint=None):
        reports.append((metrics, checkpoint and sorted(p.name for p in Path(checkpoint.path).iterdir())))

    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: ray.tune.Checkpoint.from_directory(str(tmp_path / "last")))
    monkeypatch.setattr(ray.tune, "report", report)
    train_worker({"spec": spec.model_dump(mode="json"), "via": "tune"})
    ((metrics, files),) = reports
    assert metrics["epoch"] == 1.0 and "linear_top1" in metrics and metrics[RESTORED_FROM_KEY] == 1.0
    assert [h["epoch"] for h in json.loads(metrics[RESTORED_HISTORY_KEY])] == [1.0]
    assert files == sorted([CHECKPOINT_FILE, RECORD_FILE, EVALUATION_FILE])
    assert load_arrays(tmp_path / "last" / EVALUATION_FILE).keys() == {"embedding_2d", "labels", "confusion", "class_names"}


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_tracking_server_killed_mid_search_never_stalls_training_and_loses_nothing(tmp_path, cli_here):
    """A real `mlflow server` (on PostgreSQL where it is installed), SIGKILLed in the middle of a trial until
    the console has said so and 5 more epochs have trained, then started again on the same store. MLflow's
    own client would block the Tune loop (and so the trial) for about 247 s per call; here the trial's epochs
    keep their pace, the console says when the server went away and came back, and afterwards the store
    holds every epoch once."""
    script = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "services.py")]
    services = [*script, "mlflow"]
    server_dir = tmp_path / "mlflow-server"
    backend = []  # the server's store: PostgreSQL where it is installed (CI installs it), else sqlite
    if shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        postgres = json.loads(subprocess.run([*script, "postgres", "start", "--dir", str(tmp_path / "pg")],
                                             capture_output=True, text=True, check=True, timeout=180).stdout)
        backend = ["--backend-store-uri", postgres["uri"]]
    started = json.loads(subprocess.run([*services, "start", "--dir", str(server_dir), *backend], capture_output=True,
                                        text=True, check=True, timeout=180).stdout)
    epochs, trained_while_down = 16, 5
    raw = slow_search_spec(num_samples=1, epochs=epochs)
    raw["mlflow"] = {"tracking_uri": started["url"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = start_cli(["run", "spec.yaml", "--name", "o"], cwd=tmp_path)
    try:
        def results():
            files = list((tmp_path / "ssl_tune_runs").glob("o-*/run_trial_*/result.json"))
            return [json.loads(line) for line in files[0].read_text().splitlines()] if files else []

        wait_for(lambda: len(results()) >= 3, 300, "three epochs", proc)
        subprocess.run([*services, "stop", "--dir", str(server_dir), "--kill"], check=True, timeout=60)
        down_at, down_at_epoch = time.monotonic(), len(results())
        wait_for(lambda: "is unreachable" in output(proc) and len(results()) >= down_at_epoch + trained_while_down, 300,
                 "the outage on the console and 5 epochs trained meanwhile", proc)
        during_outage, outage_s = len(results()) - down_at_epoch, time.monotonic() - down_at
        subprocess.run([*services, "start", "--dir", str(server_dir), "--port", str(started["port"]), *backend],
                       check=True, capture_output=True, timeout=180)
        proc.wait(timeout=600)
        client = tracking.client_for(started["url"])
        experiment = client.get_experiment_by_name("search-test")
        runs = client.search_runs([experiment.experiment_id])
        steps = epoch_steps(client, next(r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"))
        # The winner's checkpoint went to the server's artifact store after the outage: export it from
        # another directory, with Ray's storage gone.
        epoch_results = results()
        shutil.rmtree(tmp_path / "ssl_tune_runs")
        (tmp_path / "elsewhere").mkdir()
        export_status, _, export_err = cli_here("export", "search-test", "--tracking-uri", started["url"], "--out",
                                                "best", cwd=tmp_path / "elsewhere")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*services, "stop", "--dir", str(server_dir)], timeout=60)
        if backend:
            subprocess.run([*script, "postgres", "stop", "--dir", str(tmp_path / "pg"), "--purge"], timeout=60)
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("is unreachable") == 1 and "reachable again" in out, out[-3000:]
    # Training went on at its pace while the server was down.
    epoch_s = [r["time_this_iter_s"] for r in epoch_results[1:]]
    typical = sorted(epoch_s)[len(epoch_s) // 2]
    print(f"tracking outage of {outage_s:.0f} s: {during_outage} epochs trained meanwhile; epoch {typical:.1f} s typical, "
          f"{max(epoch_s):.1f} s slowest")
    assert max(epoch_s) < max(3 * typical, typical + 10), epoch_s
    # Nothing lost, nothing twice.
    (parent,) = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "search"]
    (child,) = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert export_status == 0, export_err[-3000:]
    assert (tmp_path / "elsewhere" / "best" / "backbone.pt").is_file()
    assert steps == list(range(1, epochs + 1))


def tune_results(storage: Path, name: str) -> dict[str, list[dict]]:
    """Trial id -> every result Tune wrote for it (result.json), in the folder of the search named NAME."""
    found = {}
    for path in storage.glob(f"{name}-*/run_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            found[lines[-1]["trial_id"]] = lines
    return found


@pytest.mark.ray
@pytest.mark.services
@pytest.mark.slow
def test_tracking_down_past_the_end_exits_4_and_resume_completes_mlflow_from_tunes_files(tmp_path, monkeypatch, cli_here):
    """A real `mlflow server` stopped before the last trial's last epoch and started again after the
    search ended: the search exits 4 with no traceback and prints the command that completes the
    record; after it, MLflow holds exactly what Tune's result files hold."""
    services = [sys.executable, str(Path(__file__).parents[1] / "scripts" / "services.py"), "mlflow"]
    server_dir = tmp_path / "mlflow-server"
    started = json.loads(subprocess.run([*services, "start", "--dir", str(server_dir)], capture_output=True, text=True,
                                        check=True, timeout=180).stdout)
    epochs = 5
    raw = slow_search_spec(num_samples=2, epochs=epochs)
    raw["mlflow"] = {"tracking_uri": started["url"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("SSL_TUNE_TRACKING_WAIT_S", "5")  # how long the end waits for the server (default 120 s)
    proc = start_cli(["run", "spec.yaml", "--name", "e"], cwd=tmp_path)

    def last_trial_under_way():
        found = tune_results(tmp_path / "ssl_tune_runs", "e")
        return len(found) == 2 and 1 <= min(map(len, found.values())) <= epochs - 2

    try:
        wait_for(last_trial_under_way, 300, "the last trial's first epochs", proc)
        subprocess.run([*services, "stop", "--dir", str(server_dir), "--kill"], check=True, timeout=60)
        proc.wait(timeout=300)
        out = output(proc)
        assert proc.returncode == 4, out[-4000:]
        assert "search complete, tracking incomplete" in out and "Traceback" not in out, out[-4000:]
        command = printed_command(out, "complete the record with:  ")
        assert command[:1] == ["resume"] and started["url"] in command
        subprocess.run([*services, "start", "--dir", str(server_dir), "--port", str(started["port"])],
                       check=True, capture_output=True, timeout=180)
        completed = run_cli(command, cwd=tmp_path)
        again = cli_here(*command)  # refused before Ray starts: in-process
        assert not ray_started()
        client = tracking.client_for(started["url"])
        parent = tracking.find_parent_run(client, "e")
        children = tracking.child_runs(client, parent)
        logged = {(c.info.run_id, key): sorted((m.step, m.value) for m in client.get_metric_history(c.info.run_id, key))
                  for c in children for key in ("epoch", "loss", "knn_top1")}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([*services, "stop", "--dir", str(server_dir)], timeout=60)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "completed the MLflow record of 1 trial(s)" in completed.stdout and "search finished: 2 trials" in completed.stdout
    assert again[0] == 2 and "already ended" in again[2]  # nothing left to do
    assert parent.info.status == "FINISHED" and parent.data.tags.get(tracking.TAG_BEST_TRIAL_RUN)
    files = tune_results(tmp_path / "ssl_tune_runs", "e")
    assert sorted(files) == sorted(c.data.tags[tracking.TAG_TRIAL_ID] for c in children)
    for child in children:
        lines = files[child.data.tags[tracking.TAG_TRIAL_ID]]
        assert child.info.status == "FINISHED" and child.data.tags.get(tracking.TAG_CHECKPOINT_ARTIFACT)
        assert int(child.data.tags[tracking.TAG_CHECKPOINT_EPOCH]) == epochs
        for key in ("epoch", "loss", "knn_top1"):
            assert logged[child.info.run_id, key] == [(int(line["epoch"]), pytest.approx(line[key])) for line in lines]


# --- a node dies under a multi-worker trial -----------------------------------------------------


def placement_groups_and_cpus(address: str) -> tuple[dict[str, str], float, float]:
    """(placement group id -> state, available CPUs, total CPUs) of a running cluster, from a fresh driver."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([{k: v['state'] for k, v in ray.util.placement_group_table().items()}, "
            "ray.available_resources().get('CPU', 0), ray.cluster_resources().get('CPU', 0)]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.ray
@pytest.mark.slow
def test_node_lost_under_a_two_worker_trial_restarts_it_from_its_checkpoint(tmp_path, monkeypatch):
    """The issue's scenario: two 1-CPU nodes, a 2-worker SPREAD trial, the second node's raylet
    SIGKILLed mid-trial. The trial cannot be placed on what is left, says so and waits (each attempt
    up to the worker-group start timeout, 15 s here); a node added later takes the restarted trial
    (no leftover placement group holds it), which continues from its checkpoint in the same run."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")  # inherited by the nodes and the driver
    # The GCS declares a silent node dead after 3 missed health checks 1 s apart (5 x 3 s by default).
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[], max_failures=3)
    raw["training"] = {"epochs": 6, "batch_size": 100, "seed": 0}
    raw["backbone"]["width"], raw["data"] = 8, {"subset": FAULT_SUBSET}  # seconds per epoch: the node dies mid-trial
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.9, "placement_strategy": "SPREAD"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    address = cluster.address
    proc = start_cli(["run", "spec.yaml", "--name", "n", "--address", address], cwd=tmp_path)
    try:
        def epochs_reported():
            files = list((tmp_path / "ssl_tune_runs").glob("n-*/run_trial_*/result.json"))
            return [json.loads(line)["epoch"] for line in files[0].read_text().splitlines()] if files else []

        wait_for(lambda: len(epochs_reported()) >= 2, 300, "two epochs", proc)
        os.kill(doomed.all_processes["raylet"][0].process.pid, signal.SIGKILL)
        killed_at = time.time()
        # The restart cannot be placed on the one CPU left: the console says so, attempt by attempt.
        wait_for(lambda: "worker group startup timed out" in output(proc).lower(), 240, "a visible wait for capacity", proc)
        waited = time.time() - killed_at
        cluster.add_node(num_cpus=1)
        added_at = time.time()
        resumed = len(epochs_reported())
        wait_for(lambda: len(epochs_reported()) > resumed, 240, "an epoch on the new node", proc)
        restart_s = time.time() - added_at
        # While the restarted trial trains, only its own reservations hold CPUs: the Tune trial's
        # (0.01) and its Train run's 2 x 0.9; nothing an earlier attempt left behind.
        groups, available, total = placement_groups_and_cpus(address)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown()
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    print(f"node lost: visible wait after {waited:.0f} s; first epoch {restart_s:.0f} s after a node was added")
    assert "restarts from its latest checkpoint after:" in out
    client, (parent,), children = runs_of(tmp_path)
    (child,) = children  # one MLflow run for the trial, whatever its attempts
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert int(child.data.tags[tracking.TAG_RESTARTS]) >= 2  # the node's death, then at least one wait
    # The waits for capacity were restarts of their own (the console showed them); the tag keeps the last reason,
    # which may also be a worker lost as the group restarted on the new node (seen once: gloo's "connection
    # closed by peer"), after which the trial went on all the same.
    assert tracking.TAG_LAST_RESTART in child.data.tags and out.lower().count("worker group startup timed out") >= 1
    assert epoch_steps(client, child) == [1, 2, 3, 4, 5, 6]  # every epoch logged once
    results = [json.loads(line) for line in
               next((tmp_path / "ssl_tune_runs").glob("n-*/run_trial_*/result.json")).read_text().splitlines()]
    first_after = next(i for i, r in enumerate(results) if RESTORED_FROM_KEY in r)
    restored, reached = results[first_after][RESTORED_FROM_KEY], max(r["epoch"] for r in results[:first_after])
    assert restored >= 2  # continued from a checkpoint, not from scratch
    # Epochs trained twice, counted (none when the node died between a checkpoint and its result).
    assert int(child.data.tags[tracking.TAG_EPOCHS_LOST]) == max(0, reached - restored)
    print(f"node lost at epoch {reached:.0f}, restored from epoch {restored:.0f}")
    assert child.data.metrics["worker_nodes"] == 2.0  # the restarted trial spread over the head and the new node
    assert parent.data.tags["ssl_tune.ray_address"] == address
    assert sorted(state for state in groups.values() if state != "REMOVED") == ["CREATED", "CREATED"], groups
    assert total - available == pytest.approx(0.01 + 2 * 0.9, abs=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_placement_groups_left_by_an_earlier_attempt_are_removed(tmp_path):
    import ray
    from ray.util.placement_group import placement_group

    from ssl_tune.trials.runner import record_placement_group, remove_leftover_placement_groups

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        leftover = placement_group([{"CPU": 0.5}])
        ray.get(leftover.ready())

        @ray.remote(num_cpus=0.1)
        def records(run_dir):
            record_placement_group(run_dir)  # what rank 0 of a Train run does

        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray.get(records.options(scheduling_strategy=PlacementGroupSchedulingStrategy(leftover)).remote(tmp_path))
        assert ray.available_resources()["CPU"] == pytest.approx(0.5)
        assert remove_leftover_placement_groups(tmp_path) == [leftover.id.hex()]
        assert ray.util.placement_group_table(leftover)["state"] == "REMOVED"
        wait_for(lambda: ray.available_resources().get("CPU") == pytest.approx(1.0), 30, "the CPU back")
        assert remove_leftover_placement_groups(tmp_path) == []  # nothing left to remove
        assert remove_leftover_placement_groups(tmp_path / "no-such-run") == []
    finally:
        ray.shutdown()


def test_the_end_waits_while_the_server_answers_and_gives_up_once_it_stops(tmp_path):
    """A replay of many epochs against a server just back outlasts the wait (SSL_TUNE_TRACKING_WAIT_S): it must
    not give up while the server answers, only once it stops answering for that long."""
    real = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    flaky = FlakyClient(real)
    writer = tracking.MlflowWriter("sqlite:///x", lambda: flaky, retry_s=0.1)
    written = []
    for i in range(8):  # 8 updates of 0.25 s each: 2 s of writing against a 0.5-s wait
        writer.submit(lambda i=i: (time.sleep(0.25), written.append(i)))
    assert writer.drain(timeout=0.5) and written == list(range(8))
    flaky.down = True
    writer.submit(lambda: flaky.search_experiments(max_results=1))
    started = time.monotonic()
    assert not writer.drain(timeout=0.5) and writer.pending == 1
    assert time.monotonic() - started < 5


def test_a_figure_that_fails_while_the_server_answers_is_dropped_not_held(tmp_path, capfd):
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    writer = tracking.MlflowWriter("sqlite:///x", lambda: client, retry_s=0.1)
    written = []

    def broken_figure():
        raise ValueError("a plotting corner case")

    writer.submit(broken_figure, best_effort="figures after trial t1")
    writer.submit(lambda: written.append(1))
    assert writer.drain(timeout=30) and written == [1]
    err = capfd.readouterr().err
    assert "warning: figures after trial t1 not logged (ValueError: a plotting corner case)" in err
    assert "unreachable" not in err
