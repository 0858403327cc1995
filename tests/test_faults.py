"""Faults: a dead worker, an interrupted or killed driver and `ssl-tune resume`, a multi-node
cluster, unreachable tracking, infeasible resources. Real Ray, real MLflow (sqlite), no mocks of
either; the tracking-outage test wraps a real client."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_tune import tracking
from ssl_tune.search import check_cluster_paths, check_resources
from ssl_tune.spec import SpecError, spec_from_dict
from tests.conftest import tiny_spec_dict
from tests.test_search import run_cli, runs_of, search_spec

SSL_TUNE = str(Path(sys.executable).parent / "ssl-tune")


def epoch_steps(client, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: " + output(proc)[-4000:])
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start_cli(args, cwd):
    """`ssl-tune ARGS` in its own process group, output to a file (Ray's output would fill a pipe)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "RAY_ADDRESS": ""}
    log = open(Path(cwd) / f"cli-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([SSL_TUNE, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    proc.log = log
    return proc


def output(proc) -> str:
    proc.log.flush()
    return Path(proc.log.name).read_text()


def slow_search_spec(num_samples, epochs, **search):
    raw = search_spec(num_samples=num_samples, scheduler="none", points_to_evaluate=[], max_concurrent=1, **search)
    raw["training"] = {"epochs": epochs, "batch_size": 250, "seed": 0}
    return raw


# --- before any trial -------------------------------------------------------------------------


def test_unreachable_tracking_server_exits_2_before_any_trial(tmp_path):
    raw = search_spec()
    raw["mlflow"] = {"tracking_uri": "http://127.0.0.1:9"}  # the discard port: nothing listens
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    start = time.time()
    proc = run_cli(["run", "spec.yaml"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
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
        check_cluster_paths(str(tmp_path), "sqlite:///x.db", "ray://head:10001", nodes(2))
    check_cluster_paths(str(tmp_path), "http://mlflow:5000", "local", nodes(2))  # one local machine: fine


# --- a worker dies -----------------------------------------------------------------------------


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_run(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(slow_search_spec(num_samples=1, epochs=4)))
    proc = start_cli(["run", "spec.yaml", "--name", "w"], cwd=tmp_path)
    try:
        result_file = wait_for(lambda: next((p for p in (tmp_path / "ssl_tune_runs" / "w").glob("run_trial_*/result.json")
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
    pids = {json.loads(line)["pid"] for line in result_file.read_text().splitlines()}
    assert len(pids) == 2  # a new process finished the trial


# --- the driver stops -------------------------------------------------------------------------


def test_interrupted_and_killed_driver_then_resume_finishes_every_trial_once(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(slow_search_spec(num_samples=4, epochs=3)))

    def trials_running_with_epochs():
        _, _, children = runs_of(tmp_path)
        return children

    # 1. Ctrl-C (SIGINT) while the second trial runs: a clean stop, runs closed, a resume hint.
    proc = start_cli(["run", "spec.yaml", "--name", "d"], cwd=tmp_path)
    wait_for(lambda: any(c.info.status == "FINISHED" for c in trials_running_with_epochs())
             and any(c.info.status == "RUNNING" and c.data.metrics.get("epoch", 0) >= 1
                     for c in trials_running_with_epochs()), 300, "one finished and one running trial", proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    out = output(proc)
    assert proc.returncode == 130, out[-4000:]
    client, (parent,), children = runs_of(tmp_path)
    assert "resume with:  ssl-tune resume " + parent.info.run_id in out
    assert parent.info.status == "KILLED"
    assert "RUNNING" not in {c.info.status for c in children}
    interrupted = [c for c in children if c.info.status == "KILLED"]
    assert interrupted and all(tracking.TAG_INTERRUPTED_AT in c.data.tags for c in interrupted)

    # 2. resume, then SIGKILL the whole driver (and its local Ray) in the middle of a trial.
    proc = start_cli(["resume", "search-test"], cwd=tmp_path)
    done_before = sum(c.info.status == "FINISHED" for c in children)
    wait_for(lambda: sum(c.info.status == "FINISHED" for c in trials_running_with_epochs()) > done_before
             and any(c.info.status == "RUNNING" and c.data.metrics.get("epoch", 0) >= 1
                     for c in trials_running_with_epochs()), 300, "progress after resuming", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    _, (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "RUNNING"  # nobody closed it: the driver died

    # 3. resume again: everything finishes, nothing is duplicated.
    proc = run_cli(["resume", "search-test"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "search finished: 4 trials" in proc.stdout
    client, (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["ssl_tune.resumed"] == "2"
    assert len(children) == 4 and len({c.data.tags[tracking.TAG_TRIAL_ID] for c in children}) == 4
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        assert epoch_steps(client, child) == [1, 2, 3], child.data.tags[tracking.TAG_TRIAL_ID]
    sampled = {(c.data.params["method.lam2"], c.data.params["method.tau"]) for c in children}
    assert len(sampled) == 4  # the Optuna study went on: no point repeated, none lost


# --- a multi-node cluster ---------------------------------------------------------------------


def test_two_worker_trial_spreads_over_two_nodes_of_a_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1)
    address = cluster.address
    try:
        cluster.wait_for_nodes()
        raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
        raw["training"]["epochs"] = 1
        raw["resources"] = {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "SPREAD"}
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
        proc = run_cli(["run", "spec.yaml", "--address", address], cwd=tmp_path, timeout=600)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, (parent,), (child,) = runs_of(tmp_path)
    assert child.info.status == "FINISHED" and child.data.metrics["worker_nodes"] == 2.0
    assert parent.data.tags["ssl_tune.ray_address"] == address


# --- tracking goes away mid-search ------------------------------------------------------------


class FlakyClient:
    """A real MlflowClient whose calls fail while `down` is set, like a server that went away."""

    def __init__(self, client):
        self.client, self.down = client, False

    def __getattr__(self, name):
        attr = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("connection refused")
            return attr(*args, **kwargs)

        return call


class FakeTrial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config, self.last_result, self.error_file = trial_id, config, {}, None


def test_metrics_logged_while_tracking_is_down_are_written_when_it_returns(tmp_path, capsys):
    spec = spec_from_dict({**tiny_spec_dict(training={"epochs": 3, "batch_size": 32, "seed": 0}),
                           "search": {"metric": "loss", "mode": "min"}})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    real = tracking.client_for(uri)
    experiment = real.create_experiment("flaky")
    parent = real.create_run(experiment, tags={tracking.TAG_KIND: "search"}).info.run_id
    logger = tracking.MlflowTrialLogger(uri, experiment, parent, spec)
    logger._client = flaky = FlakyClient(real)
    trial = FakeTrial("t1", {})
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"epoch": 1.0, "loss": 3.0})
    flaky.down = True
    for epoch in (2, 3):
        logger.on_trial_result(0, [], trial, {"epoch": float(epoch), "loss": 3.0 - epoch})
    logger.on_trial_complete(0, [], trial)
    assert capsys.readouterr().err.count("unreachable") == 1  # one warning, no exception
    flaky.down = False
    logger.on_experiment_end([])
    (child,) = [r for r in real.search_runs([experiment]) if r.data.tags.get(tracking.TAG_KIND) == "trial"]
    assert [(m.step, m.value) for m in real.get_metric_history(child.info.run_id, "loss")] == [(1, 3.0), (2, 1.0), (3, 0.0)]
    assert child.info.status == "FINISHED"
    assert "reachable again" in capsys.readouterr().err
