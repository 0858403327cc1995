"""Before any trial: a dead cluster address, bad data and untrusted pickles stop with exit 2 and a
message naming the address, file or field; a search whose every trial fails exits non-zero."""

import os
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ssl_tune import tracking
from ssl_tune.cli import main
from ssl_tune.data.cache import open_dataset
from ssl_tune.data.datasets import DataError, load_dataset
from ssl_tune.spec.files import spec_from_dict
from ssl_tune.searching.folder import trusted_experiment_dir
from ssl_tune.storage_path import StoragePath
from tests.conftest import image_folder, ray_started, run_cli, search_spec, tiny_spec_dict


class RunsAShellCommand:
    """What a crafted pickle holds: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a cluster address where nothing listens ---------------------------------------------------


def test_dead_ray_address_exits_2_within_seconds(tmp_path, cli_here):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(search_spec()))
    port = free_port()  # closed again: nothing listens there
    started = time.time()
    status, out, err = cli_here("run", "spec.yaml", "--address", f"127.0.0.1:{port}")  # refused before Ray: in-process
    assert status == 2, out[-2000:] + err[-2000:]
    assert time.time() - started < 30
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers there" in err
    assert "ray start --head" in err and "Traceback" not in err
    assert not ray_started()


# --- bad data ----------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def imagefolder_spec(tmp_path: Path, root: Path, **search) -> Path:
    raw = search_spec(**search) if search else tiny_spec_dict()
    raw["data"] = {"name": "imagefolder", "root": str(root), "image_size": 12}
    raw["training"] = {"epochs": 1, "batch_size": 4, "seed": 0}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "spec.yaml"


@pytest.mark.ray
@pytest.mark.slow
def test_corrupt_image_is_named_by_train_and_by_run_before_any_trial(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    truncate(root / "train" / "b" / "1.jpg")
    with pytest.raises(DataError, match=r"train/b/1\.jpg: cannot decode this image"):
        open_dataset(spec_from_dict(tiny_spec_dict(data={"name": "imagefolder", "root": str(root)})).data)

    assert main(["train", str(imagefolder_spec(tmp_path, root))]) == 2
    err = capsys.readouterr().err
    assert "train/b/1.jpg: cannot decode this image" in err and "Traceback" not in err

    imagefolder_spec(tmp_path, root, num_samples=2)
    proc = run_cli(["run", "spec.yaml"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train/b/1.jpg: cannot decode this image" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("ssl_tune_runs/**/run_trial_*"))  # no trial started


def test_empty_class_folder_and_class_mismatch_are_named(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "train" / "c").mkdir()  # an empty class
    data = spec_from_dict(tiny_spec_dict(data={"name": "imagefolder", "root": str(root)})).data
    with pytest.raises(DataError, match=r"images/train: Found no valid file for the classes c"):
        open_dataset(data)
    (root / "train" / "c").rmdir()
    (root / "test" / "d").mkdir()
    image_folder(tmp_path / "other", classes=("d",))
    for f in (tmp_path / "other" / "test" / "d").iterdir():
        f.rename(root / "test" / "d" / f.name)
    with pytest.raises(DataError, match=r"different classes \(only in one: d\)"):
        open_dataset(data)


# --- pickles from places the user does not control ----------------------------------------------


def test_crafted_cifar_batch_is_refused_by_its_checksum_before_it_is_unpickled(tmp_path):
    """A CIFAR batch is a pickle: only the published files (torchvision checks their MD5 first) are read."""
    marker = tmp_path / "code-ran"
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1], "label_names": ["a"]}
        if name == "data_batch_1":
            batch["batch_label"] = RunsAShellCommand(marker)
        with open(base / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1: not the file of the official CIFAR-10 release \(its MD5 differs"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_resume_refuses_tune_state_outside_the_storage_path_the_user_named(tmp_path, cli_here):
    """Anyone who can write tags on a shared tracking server could point a search's storage tag at
    a crafted tuner.pkl; resume must not unpickle it."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "elsewhere" / "s1"
    evil.mkdir(parents=True)
    (evil / "tuner.pkl").write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("search-test")
    parent = client.create_run(experiment, run_name="s1", tags={tracking.TAG_KIND: "search",
                                                                 tracking.TAG_STORAGE: str(evil)})
    client.log_text(parent.info.run_id, yaml.safe_dump(search_spec()), "spec.yaml")
    client.set_terminated(parent.info.run_id, "KILLED")
    status, _, err = cli_here("resume", "s1")  # in-process: refused before Ray starts
    assert status == 2, err
    assert f"names its Tune state at {evil}, which is not in the default storage path ./ssl_tune_runs" in err
    assert f" resume s1 --storage-path {evil.parent}" in err
    assert not marker.exists()


def test_trusted_experiment_dir_takes_only_directories_in_the_named_storage_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inside = str(tmp_path / "ssl_tune_runs" / "s1")
    assert str(trusted_experiment_dir(inside, None, "s1")) == inside
    assert str(trusted_experiment_dir("/shared/runs/s1", "/shared/runs/", "s1")) == "/shared/runs/s1"
    assert str(trusted_experiment_dir("s3://bucket/runs/s1/", "s3://bucket/runs", "s1")) == "s3://bucket/runs/s1"
    for tagged, root in [("/shared/runs/s1", None), ("/shared/runs/../etc/s1", "/shared/runs"),
                         ("s3://other/runs/s1", "s3://bucket/runs"), ("", None), (str(tmp_path / "ssl_tune_runs"), None)]:
        with pytest.raises(Exception, match="resume: the search's MLflow run names its Tune state"):
            trusted_experiment_dir(tagged, root, "s1")


# --- finding the search to resume -----------------------------------------------------------------


def test_searches_are_found_by_name_and_ambiguous_names_list_the_candidates(tmp_path):
    client = tracking.client_for(f"sqlite:///{tmp_path}/mlflow.db")
    exp_a, exp_b = client.create_experiment("twist"), client.create_experiment("isd")

    def search(experiment, name, status):
        run = client.create_run(experiment, run_name=name, tags={tracking.TAG_KIND: "search"})
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    first = search(exp_a, "first", "KILLED")
    search(exp_a, "second", "FINISHED")
    twins = {search(exp_a, "twin", "KILLED"), search(exp_b, "twin", "KILLED")}
    find = tracking.find_parent_run
    assert find(client, "first").info.run_id == first
    assert find(client, "twist").info.run_name == "twin"  # the experiment's latest search
    with pytest.raises(LookupError) as ambiguous:
        find(client, "twin")
    assert "2 searches are named 'twin'" in str(ambiguous.value) and all(t in str(ambiguous.value) for t in twins)
    with pytest.raises(LookupError, match="experiment 'twist' has 2 unfinished searches") as unfinished:
        find(client, "twist", unfinished=True)
    assert first in str(unfinished.value)
    assert find(client, "isd", unfinished=True).info.run_id in twins  # its only unfinished search
    with pytest.raises(LookupError, match="no MLflow experiment, search name or run id 'nope'"):
        find(client, "nope")


def test_a_storage_path_is_an_absolute_directory_or_a_uri():
    local = StoragePath.of("runs")
    assert local.local == Path.cwd() / "runs" and not local.in_object_store and local.scheme == ""
    assert StoragePath.of(local) is local and local == StoragePath.of(Path.cwd() / "runs" / ".." / "runs")
    remote = StoragePath.of("s3://bucket/runs/")
    assert str(remote) == "s3://bucket/runs" and remote.local is None and remote.scheme == "s3"
    assert str(remote / "s1") == "s3://bucket/runs/s1" and (remote / "s1").parent == remote and (remote / "s1").name == "s1"
    # Ray names a checkpoint in a bucket by its path inside it: the scheme comes back; anything else stays as it is.
    assert remote.with_scheme("bucket/runs/s1/trial/checkpoint_000001") == "s3://bucket/runs/s1/trial/checkpoint_000001"
    assert remote.with_scheme("/tmp/ray/staging/checkpoint_000001") == "/tmp/ray/staging/checkpoint_000001"
    assert remote.with_scheme("gs://other/c") == "gs://other/c" and local.with_scheme("runs/c") == "runs/c"
