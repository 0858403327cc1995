"""A team's services, for real: `mlflow server` on PostgreSQL with its artifacts in an S3-compatible
store (moto's server), all started on loopback by scripts/services.py and stopped by PID."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_tune import tracking
from tests.conftest import POSTGRES_INSTALL, ROOT, output, require_system, run_cli, search_spec, start_cli, wait_for

SERVICES = [sys.executable, str(Path(ROOT) / "scripts" / "services.py")]
pytestmark = [pytest.mark.services, pytest.mark.ray]


def postgres_installed() -> bool:
    return bool(shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb")))


@pytest.fixture
def team_server(tmp_path):
    """PostgreSQL, the S3 endpoint and `mlflow server` over both; stopped (by PID) afterwards."""
    require_system(postgres_installed(), "PostgreSQL", POSTGRES_INSTALL)

    def start(*args):
        return json.loads(subprocess.run([*SERVICES, *args], capture_output=True, text=True, check=True, timeout=180).stdout)

    started = []
    try:
        postgres = start("postgres", "start", "--dir", str(tmp_path / "pg"))
        started.append(("postgres", tmp_path / "pg"))
        s3 = start("s3", "start", "--dir", str(tmp_path / "s3"))
        started.append(("s3", tmp_path / "s3"))
        mlflow = start("mlflow", "start", "--dir", str(tmp_path / "mlflow"), "--backend-store-uri", postgres["uri"],
                       "--artifacts-destination", f"s3://{s3['bucket']}/mlflow", "--s3-endpoint", s3["endpoint"])
        started.append(("mlflow", tmp_path / "mlflow"))
        yield {"postgres": postgres, "s3": s3, "mlflow": mlflow}
    finally:
        for name, directory in reversed(started):
            subprocess.run([*SERVICES, name, "stop", "--dir", str(directory), *(["--purge"] if name == "postgres" else [])],
                           timeout=60)


@pytest.mark.slow
def test_search_on_postgres_and_s3_exports_from_anywhere_without_rays_storage(team_server, tmp_path, cli_here):
    url = team_server["mlflow"]["url"]
    raw = search_spec(num_samples=2, scheduler="none", points_to_evaluate=[])
    raw["training"]["epochs"] = 1
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "spec.yaml", "--name", "team", "--tracking-uri", url], cwd=tmp_path / "work")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "work" / "mlflow.db").exists()

    # The runs are rows of PostgreSQL, the checkpoints objects in S3.
    import boto3
    import psycopg2

    with psycopg2.connect(team_server["postgres"]["uri"].replace("+psycopg2", "")) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] == 3  # the search and its two trials
    s3 = team_server["s3"]
    objects = boto3.client("s3", endpoint_url=s3["endpoint"], **{k.lower(): v for k, v in s3["env"].items()
                                                                  if k != "AWS_DEFAULT_REGION"},
                           region_name=s3["env"]["AWS_DEFAULT_REGION"]).list_objects_v2(Bucket=s3["bucket"])
    keys = [o["Key"] for o in objects.get("Contents", [])]
    assert sum(k.endswith("/export/backbone.pt") for k in keys) == 2, keys  # each trial uploaded its export

    # From another directory, with Ray's storage gone: only the server is needed.
    shutil.rmtree(tmp_path / "work" / "ssl_tune_runs")
    (tmp_path / "elsewhere").mkdir()
    status, listed, err = cli_here("list", "--tracking-uri", url, cwd=tmp_path / "elsewhere")
    assert status == 0 and "team" in listed and "FINISHED" in listed, err
    status, _, err = cli_here("export", "team", "--tracking-uri", url, "--out", "best", cwd=tmp_path / "elsewhere")
    assert status == 0, err[-3000:]
    from ssl_tune import load_backbone

    backbone = load_backbone(tmp_path / "elsewhere" / "best").backbone
    direct = load_backbone("team", tracking_uri=url).backbone
    assert all((a == b).all() for a, b in zip(backbone.state_dict().values(), direct.state_dict().values()))
    client = tracking.client_for(url)
    (parent,) = client.search_runs([client.get_experiment_by_name("search-test").experiment_id],
                                   filter_string=f"tags.`{tracking.TAG_KIND}` = 'search'")
    assert parent.info.status == "FINISHED"


@pytest.fixture
def s3_endpoint(tmp_path):
    started = json.loads(subprocess.run([*SERVICES, "s3", "start", "--dir", str(tmp_path / "s3")], capture_output=True,
                                        text=True, check=True, timeout=180).stdout)
    try:
        yield started
    finally:
        subprocess.run([*SERVICES, "s3", "stop", "--dir", str(tmp_path / "s3")], timeout=60)


@pytest.mark.slow
def test_ray_storage_on_s3_holds_the_checkpoints_resumes_after_ctrl_c_and_an_unwritable_bucket_is_refused(
        s3_endpoint, tmp_path, monkeypatch):
    for key, value in {**s3_endpoint["env"], "AWS_ENDPOINT_URL": s3_endpoint["endpoint"]}.items():
        monkeypatch.setenv(key, value)  # what every node's environment holds for the object store
    raw = search_spec(num_samples=2, scheduler="none", points_to_evaluate=[])
    raw["training"] = {"epochs": 3, "batch_size": 250, "seed": 0}
    raw["storage_path"] = "s3://no-such-bucket/runs"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    refused = run_cli(["run", "spec.yaml", "--name", "nobucket"], cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "storage_path: s3://no-such-bucket/runs cannot be written from the driver" in refused.stderr
    assert "started" not in refused.stdout  # no trial ran

    storage = f"s3://{s3_endpoint['bucket']}/runs"
    raw["storage_path"] = storage
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = start_cli(["run", "spec.yaml", "--name", "r"], cwd=tmp_path)
    wait_for(lambda: re.search(r"^\S+\s+running\s.*\s1/3\s", output(proc), re.M), 300, "an epoch", proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    out = output(proc)
    assert proc.returncode == 130, out[-3000:]
    assert f"--storage-path {storage}" in out  # the resume hint names where the Tune state is
    resumed = run_cli(["resume", "r", "--storage-path", storage], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "search finished: 2 trials" in resumed.stdout
    assert not list(tmp_path.glob("s3:*"))  # nothing of the URI became a local directory
    assert not [p for p in tmp_path.glob("ssl_tune_runs/r-*") if p.is_dir()]  # (only the driver's log is local)
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    trials = client.search_runs([client.get_experiment_by_name("search-test").experiment_id],
                                filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    for trial in trials:
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "epoch")] == [1, 2, 3]
        assert trial.data.tags[tracking.TAG_CHECKPOINT].startswith(f"{storage}/r-")
        assert trial.data.tags[tracking.TAG_CHECKPOINT_ARTIFACT] == "export"  # the trial uploaded its export
    from ssl_tune import load_backbone
    load_backbone("r", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # reads the checkpoint from S3


@pytest.mark.slow
def test_a_server_with_authentication_takes_a_search_with_credentials_and_refuses_one_without(tmp_path, monkeypatch,
                                                                                              cli_here):
    server = json.loads(subprocess.run([*SERVICES, "mlflow", "start", "--dir", str(tmp_path / "mlflow"), "--auth"],
                                       capture_output=True, text=True, check=True, timeout=180).stdout)
    try:
        raw = search_spec(num_samples=1, scheduler="none", points_to_evaluate=[])
        raw["training"]["epochs"] = 1
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        status, _, err = cli_here("run", "spec.yaml", "--tracking-uri", server["url"])  # (refused before Ray)
        assert status == 2
        assert f"the MLflow tracking server at {server['url']} refused this client without credentials (HTTP 401" \
            in err and "MLFLOW_TRACKING_USERNAME" in err
        assert not (tmp_path / "ssl_tune_runs").exists()  # before any trial
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server["username"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server["password"])
        proc = run_cli(["run", "spec.yaml", "--name", "authed", "--tracking-uri", server["url"]], cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        status, listed, _ = cli_here("list", "--tracking-uri", server["url"])
        assert status == 0 and "authed" in listed and "FINISHED" in listed
    finally:
        subprocess.run([*SERVICES, "mlflow", "stop", "--dir", str(tmp_path / "mlflow")], timeout=60)
