"""Separate hosts, for real: two Ray nodes in two network namespaces joined by a private veth pair
(scripts/netns_cluster.py), Ray's storage on an S3 endpoint in the first namespace. A 2-worker DDP
trial spreads over both nodes and its checkpoints land in S3."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ssl_tune import tracking
from tests.conftest import (FAULT_SUBSET, IPROUTE_INSTALL, ROOT, SSL_TUNE, namespaces_allowed, output, require_system,
                            search_spec, wait_for)

SCRIPTS = Path(ROOT) / "scripts"
pytestmark = [pytest.mark.netns, pytest.mark.ray]
PREFIX, SUBNET = f"sslt{os.getpid() % 10000}", f"10.213.{os.getpid() % 200 + 20}"


def netns_addresses() -> tuple[str, str]:
    return f"{SUBNET}.1", f"{SUBNET}.2"


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """One cluster for this module's tests (its start-up is most of a short test): its `node_local` directory is
    a node-local disk of the second host's own (an empty tmpfs there)."""
    require_system(namespaces_allowed(), "network namespaces", IPROUTE_INSTALL)
    sys.path.insert(0, str(SCRIPTS))
    import netns_cluster
    import services

    work = tmp_path_factory.mktemp("two-hosts")
    head_ip, _ = netns_cluster.addresses(SUBNET)
    directory, node_local = work / "cluster", work / "node-local"
    netns_cluster.up(PREFIX, SUBNET)
    try:
        s3 = json.loads(subprocess.run(["ip", "netns", "exec", f"{PREFIX}-a", sys.executable, str(SCRIPTS / "services.py"),
                                        "s3", "start", "--dir", str(work / "s3"), "--host", head_ip],
                                       capture_output=True, text=True, check=True, timeout=180).stdout)
        storage_env = {**services.S3_ENV, "AWS_ENDPOINT_URL": s3["endpoint"]}
        ray = netns_cluster.start_ray(PREFIX, SUBNET, directory, cpus=1, env=storage_env, worker_private_dir=node_local)
        yield {"address": ray["address"], "env": {**ray["env"], **storage_env}, "bucket": s3["bucket"],
               "directory": directory, "storage_env": storage_env, "cluster": netns_cluster, "node_local": node_local}
    finally:
        netns_cluster.down(PREFIX, directory)
        services.stop(work / "s3", "s3")
        sys.path.remove(str(SCRIPTS))


@pytest.mark.slow
def test_a_two_worker_trial_spreads_over_two_hosts_with_storage_on_s3(two_hosts, tmp_path):
    """Also: the image folder's cache is built on each host, on its own node-local disk, before the trial."""
    from benchmarks.data import image_folder_generator

    root = image_folder_generator().make_image_folder(tmp_path / "images", images=60, size=24, classes=3)
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
    raw["training"].update(epochs=2, batch_size=16)
    # The second host sees this directory as a private tmpfs of its own (a node-local disk).
    raw["data"] = {"name": "imagefolder", "root": str(root), "image_size": 16, "cache_dir": str(two_hosts["node_local"])}
    # Train's controller takes about 0.01 CPU: two 1-CPU nodes hold two 0.9-CPU workers.
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.9, "placement_strategy": "SPREAD"}
    raw["storage_path"] = f"s3://{two_hosts['bucket']}/runs"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, **two_hosts["env"], "MLFLOW_TRACKING_URI": "", "RAY_ADDRESS": ""}
    proc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-a", SSL_TUNE, "run", "spec.yaml", "--name", "hosts",
                           "--address", two_hosts["address"]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    (trial,) = client.search_runs([client.get_experiment_by_name("search-test").experiment_id],
                                  filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert trial.info.status == "FINISHED"
    assert trial.data.metrics["worker_nodes"] == 2.0  # one worker in each namespace
    # Each host decoded the folder into its own cache (a Ray task per node, progress shown here), before
    # the trial started; the trial's workers only mapped it (trials never decode).
    lines = proc.stdout.splitlines()
    for host in netns_addresses():
        built = [i for i, line in enumerate(lines) if line.startswith(f"[{host}] data cache ") and "built in" in line]
        assert built and built[0] < next(i for i, line in enumerate(lines) if line.startswith("trial ")), proc.stdout
    (manifest,) = two_hosts["node_local"].glob("imagefolder-*/manifest.json")  # the first host's copy
    created = time.mktime(time.strptime(json.loads(manifest.read_text())["created"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert created <= trial.info.start_time / 1000 + 1
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")] == [1, 2]
    # Ray's storage is the bucket: the trial's checkpoints are objects there, none on the driver's disk.
    listing = ("import boto3, sys; print('\\n'.join(o['Key'] for o in boto3.client('s3', endpoint_url=sys.argv[1])"
               ".list_objects_v2(Bucket=sys.argv[2]).get('Contents', [])))")
    keys = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-a", sys.executable, "-c", listing, env["AWS_ENDPOINT_URL"],
                           two_hosts["bucket"]], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert any(k.startswith("runs/hosts-") and k.endswith("/checkpoint.pt") for k in keys), keys
    assert not list((tmp_path / "ssl_tune_runs").rglob("checkpoint.pt"))
    assert trial.data.tags[tracking.TAG_CHECKPOINT_ARTIFACT] == "export"


@pytest.mark.slow
def test_losing_the_second_host_mid_trial_is_survived_from_its_last_checkpoint(two_hosts, tmp_path):
    """The second host's Ray node is SIGKILLed after the trial's second epoch and comes back a few
    seconds later: Tune restarts the trial from its latest checkpoint (in S3) in the same MLflow run,
    and the epochs trained twice are counted."""
    epochs = 6
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
    raw["training"]["epochs"], raw["data"] = epochs, {"subset": FAULT_SUBSET}  # epochs of seconds: the host dies mid-trial
    raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.9, "placement_strategy": "SPREAD"}
    raw["storage_path"] = f"s3://{two_hosts['bucket']}/runs"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, **two_hosts["env"], "MLFLOW_TRACKING_URI": "", "RAY_ADDRESS": ""}
    log = open(tmp_path / "cli.log", "w+")
    proc = subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-a", SSL_TUNE, "run", "spec.yaml", "--name", "lost",
                             "--address", two_hosts["address"]], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    proc.log = log
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def trial_epochs():
        client = tracking.client_for(uri)
        (trial,) = client.search_runs([client.get_experiment_by_name("search-test").experiment_id],
                                      filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
        return [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")]

    try:
        # The console's row of epoch 2 (the store is read only after the search: two processes creating
        # a sqlite store's tables at once collide).
        wait_for(lambda: re.search(rf"^\S+\s+running\s.*\s2/{epochs}\s", output(proc), re.M), 400, "two epochs", proc)
        two_hosts["cluster"].stop_node(two_hosts["directory"], "worker")  # the host is lost
        wait_for(lambda: "restarts from its latest checkpoint" in output(proc), 300, "the trial's restart", proc)
        two_hosts["cluster"].start_ray(PREFIX, SUBNET, two_hosts["directory"], cpus=1, env=two_hosts["storage_env"],
                                       worker_only=True, worker_private_dir=two_hosts["node_local"])  # and comes back
        proc.wait(timeout=700)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    out = output(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "restarts from its latest checkpoint" in out
    client = tracking.client_for(uri)
    (trial,) = client.search_runs([client.get_experiment_by_name("search-test").experiment_id],
                                  filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert trial.info.status == "FINISHED" and int(trial.data.tags[tracking.TAG_RESTARTS]) >= 1
    assert trial_epochs() == list(range(1, epochs + 1))  # every epoch once, in the same run
    assert tracking.TAG_EPOCHS_LOST in trial.data.tags and "restored_from_epoch" in trial.data.metrics


@pytest.mark.slow
def test_a_storage_path_on_the_drivers_disk_only_is_refused_before_any_trial(two_hosts, tmp_path):
    """`node-local` is a directory on the first host's disk; the second host has its own (empty) one
    there: trials on it would write checkpoints the driver never sees."""
    raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
    raw["storage_path"] = str(two_hosts["node_local"])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, **two_hosts["env"], "MLFLOW_TRACKING_URI": "", "RAY_ADDRESS": ""}
    proc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-a", SSL_TUNE, "run", "spec.yaml", "--address",
                           two_hosts["address"]], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = SUBNET + ".2"
    assert f"storage_path: {two_hosts['node_local']} is not visible from node(s) {second}" in proc.stderr
    assert "started" not in proc.stdout
