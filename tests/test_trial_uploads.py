"""What a trial writes to its own MLflow run from its own process: system metrics and its light export."""

import time

import pytest
import torch

from ssl_tune import tracking
from ssl_tune.trials import uploads as trial_uploads
from ssl_tune.trials.checkpoints import EXPORT_FILES
from ssl_tune.spec.files import spec_from_dict
from tests.conftest import tiny_dataset, tiny_spec_dict, wait_for
from trainers.loop import Trainer


@pytest.fixture
def trial_run(tmp_path, monkeypatch):
    """A search's parent run and one trial's child run in a sqlite store, as the driver makes them."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    experiment = tracking.experiment_id(client, "record")
    parent = client.create_run(experiment, tags={tracking.TAG_KIND: "search"}).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent, tracking.TAG_KIND: "trial",
                                                tracking.TAG_TRIAL_ID: "t1"}).info.run_id
    return uri, client, parent, child


def trained_export(tmp_path):
    trainer = Trainer(spec_from_dict(tiny_spec_dict(training={"epochs": 1, "batch_size": 32})),
                      dataset=tiny_dataset(n=64))
    trainer.fit()
    return trainer, trainer.write_export(tmp_path / "export")


def test_the_trial_uploads_its_export_without_optimizer_state_and_logs_system_metrics(tmp_path, trial_run):
    uri, client, parent, child = trial_run
    trainer, export = trained_export(tmp_path)
    recorder = trial_uploads.TrialRecorder(uri, parent, "t1")
    deadline = time.monotonic() + 30
    while recorder.run_id is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert recorder.run_id == child
    assert recorder.upload_export(export) and not export.exists()  # uploaded, then the local copy removed
    system = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    wait_for(lambda: system <= set(client.get_run(child).data.metrics), 30, "the system metrics' first sample")
    recorder.close()

    run = client.get_run(child)
    assert run.data.tags[tracking.TAG_CHECKPOINT_ARTIFACT] == "export"
    assert run.data.tags[trial_uploads.TAG_EXPORT_EPOCH] == "1"
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(child, "export")} == set(EXPORT_FILES)
    heads = torch.load(client.download_artifacts(child, "export/head.pt", str(tmp_path)), weights_only=True)
    assert not [k for k in heads if k.startswith("backbone.")] and heads  # the head's weights only, no optimizer
    assert system <= set(run.data.metrics)
    with tracking.checkpoint_of(client, run) as directory:  # what export reads when Ray's storage is not here
        from ssl_tune import load_backbone

        backbone = load_backbone(directory).backbone
    for a, b in zip(backbone.state_dict().values(), trainer.method.backbone.state_dict().values()):
        assert torch.equal(a, b)


def test_training_never_waits_on_a_tracking_server_that_is_away(tmp_path, trial_run, monkeypatch):
    uri, client, parent, child = trial_run
    _, export = trained_export(tmp_path)
    recorder = trial_uploads.TrialRecorder(uri, parent, "t1", system_metrics=False)
    deadline = time.monotonic() + 30
    while recorder.run_id is None and time.monotonic() < deadline:
        time.sleep(0.1)

    class Away:
        def log_artifacts(self, *args):
            raise ConnectionError("the tracking server is away")

    monkeypatch.setattr(recorder, "_client", Away)
    start = time.monotonic()
    assert not recorder.upload_export(export)  # one failed attempt, then training goes on
    recorder.close()
    assert time.monotonic() - start < 10
    assert tracking.TAG_CHECKPOINT_ARTIFACT not in client.get_run(child).data.tags  # the driver uploads it instead


def test_a_node_that_does_not_see_a_file_store_writes_nothing_to_it(tmp_path):
    assert trial_uploads.reachable_here(f"sqlite:///{tmp_path}")
    assert not trial_uploads.reachable_here(f"sqlite:///{tmp_path}/elsewhere/mlflow.db")
    assert trial_uploads.reachable_here("http://mlflow:5000") and trial_uploads.reachable_here("postgresql+psycopg2://db/x")
