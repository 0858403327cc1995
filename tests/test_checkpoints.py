"""Checkpoints that can be trusted: written whole or not at all, verified before use, a damaged latest
skipped for the one before it, and a disk that fills named in one line."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from ssl_tune import tracking
from ssl_tune.trials import checkpoints
from ssl_tune.trials.checkpoints import CHECKPOINT_FILE, RECORD_FILE, CheckpointError
from ssl_tune.storage_path import StoragePath
from ssl_tune.trials.runner import CHECKPOINTS_KEPT, DAMAGED_CHECKPOINT_KEY, RayReporter, restore
from tests.conftest import (epoch_steps, image_folder, output, run_cli, runs_of, search_spec, slow_search_spec, small_disk,
                            start_cli, wait_for)


def state(epoch: int) -> dict:
    return {"epoch": epoch, "weights": torch.arange(50_000, dtype=torch.float32) * epoch}


def test_a_checkpoint_is_recorded_and_a_truncated_or_altered_one_is_named_with_its_reason(tmp_path):
    path = checkpoints.save(state(3), tmp_path / "c")
    record = json.loads((tmp_path / "c" / RECORD_FILE).read_text())
    assert record["bytes"] == path.stat().st_size and len(record["sha256"]) == 64
    assert checkpoints.load(tmp_path / "c")["epoch"] == 3
    assert not list((tmp_path / "c").glob("*.tmp"))

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: is damaged: [\d,]+ bytes on disk, [\d,]+ written"):
        checkpoints.load(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        checkpoints.load(path)
    (tmp_path / "c" / RECORD_FILE).unlink()  # a checkpoint from before the record: torch's own error, named
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: cannot be loaded \("):
        checkpoints.load(path)


def test_a_checkpoint_that_does_not_fit_on_the_disk_leaves_nothing_and_says_so(tmp_path):
    with small_disk(tmp_path / "disk", 1) as disk:
        checkpoints.save(state(1), disk / "c")  # 200 kB: fits
        before = (disk / "c" / CHECKPOINT_FILE).read_bytes()
        with pytest.raises(CheckpointError, match=r"cannot be written: the disk is full") as caught:
            checkpoints.save({"epoch": 2, "weights": torch.zeros(400_000)}, disk / "c")  # 1.6 MB
        assert caught.value.disk_full and str(disk / "c" / CHECKPOINT_FILE) in str(caught.value)
        assert sorted(p.name for p in (disk / "c").iterdir()) == [RECORD_FILE, CHECKPOINT_FILE]
        assert (disk / "c" / CHECKPOINT_FILE).read_bytes() == before  # the previous one is intact
        assert checkpoints.load(disk / "c")["epoch"] == 1


def test_a_full_disk_is_known_by_its_error_number_and_type_across_a_process_boundary_not_by_its_words():
    import errno
    import pickle

    assert checkpoints.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = RuntimeError("basic_ios::clear: iostream error")  # torch.save over a Python file that hit a quota
    wrapped.__context__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert checkpoints.disk_full(wrapped)
    # A trial's checkpoint error, as a Ray worker's exception reaches the driver: pickled, its disk_full kept.
    error = pickle.loads(pickle.dumps(checkpoints.write_error("/storage/t/checkpoint.pt", wrapped)))
    assert type(error) is CheckpointError and error.disk_full and checkpoints.disk_full(error)
    assert str(error) == "checkpoint /storage/t/checkpoint.pt: cannot be written: the disk is full"
    assert not checkpoints.disk_full(RuntimeError("the worker said: No space left on device"))  # words only
    assert not pickle.loads(pickle.dumps(CheckpointError("/c", "is damaged"))).disk_full


def test_train_resume_from_a_damaged_checkpoint_is_exit_2_naming_it(tmp_path, capsys):
    from ssl_tune.cli import main
    from tests.conftest import tiny_spec_dict, write_spec

    path = checkpoints.save(state(1), tmp_path / "c")
    path.write_bytes(path.read_bytes()[:100])
    assert main(["train", str(write_spec(tmp_path, tiny_spec_dict())), "--resume", str(path),
                 "--out", str(tmp_path / "out")]) == 2
    assert f"error: checkpoint {path}: is damaged" in capsys.readouterr().err


class _Trainer:
    """What `restore` needs of a Trainer: load_checkpoint (verified) and the epoch it reached."""

    epoch = 0

    def load_checkpoint(self, directory: Path) -> None:
        self.epoch = checkpoints.load(directory)["epoch"]


def test_restore_skips_a_damaged_latest_checkpoint_for_the_one_before_and_fails_when_none_loads(tmp_path):
    import ray.tune

    for epoch in (1, 2):
        checkpoints.save(state(epoch), tmp_path / f"checkpoint_00000{epoch - 1}")
    latest = tmp_path / "checkpoint_000001" / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:1000])
    trainer, report = _Trainer(), RayReporter(lambda *a, **k: None, ray.tune.Checkpoint)
    restore(trainer, ray.tune.Checkpoint(str(tmp_path / "checkpoint_000001")), report)
    assert trainer.epoch == 1
    assert f"checkpoint {tmp_path / 'checkpoint_000001'}: is damaged" in report.once[DAMAGED_CHECKPOINT_KEY]

    earlier = tmp_path / "checkpoint_000000" / CHECKPOINT_FILE
    earlier.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'checkpoint_000001'}: is damaged.*"
                                              f"checkpoint {tmp_path / 'checkpoint_000000'}: is damaged"):
        restore(_Trainer(), ray.tune.Checkpoint(str(tmp_path / "checkpoint_000001")), report)


@pytest.mark.ray
@pytest.mark.slow
def test_a_truncated_checkpoint_at_resume_is_named_and_the_trial_goes_on_from_the_one_before(tmp_path):
    raw = slow_search_spec(num_samples=1, epochs=6)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    proc = start_cli(["run", "spec.yaml", "--name", "k"], cwd=tmp_path)
    wait_for(lambda: any(c.data.metrics.get("epoch", 0) >= 2 for c in runs_of(tmp_path)[2]), 300, "epoch 2", proc)
    os.kill(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130, output(proc)[-3000:]
    _, _, (child,) = runs_of(tmp_path)
    # Tune's latest checkpoint (a later one may be on disk, written as the signal came but never registered)
    latest_dir = Path(child.data.tags[tracking.TAG_CHECKPOINT])
    earlier_dir = latest_dir.with_name(f"checkpoint_{int(latest_dir.name[-6:]) - 1:06d}")
    assert earlier_dir.is_dir()  # the one before it is kept (CHECKPOINTS_KEPT)
    latest = latest_dir / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    resumed = run_cli(["resume", "k"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"skipped a damaged checkpoint: checkpoint {latest_dir}: is damaged" in resumed.stdout
    client, _, (child,) = runs_of(tmp_path)
    assert child.info.status == "FINISHED" and epoch_steps(client, child) == [1, 2, 3, 4, 5, 6]
    assert str(latest_dir) in child.data.tags[tracking.TAG_DAMAGED_CHECKPOINT]
    assert len(list(latest_dir.parent.glob("checkpoint_*"))) == CHECKPOINTS_KEPT  # when the trial has ended
    assert int(child.data.tags[tracking.TAG_EPOCHS_LOST]) == 1  # the damaged checkpoint's epoch, trained again


@pytest.mark.ray
@pytest.mark.slow
def test_a_storage_disk_that_fills_stops_the_search_in_one_line_and_resume_finishes_it(tmp_path):
    """The storage path on a 20 MB tmpfs, filled while the first trial trains: exit 5 with one line naming
    the path (no traceback, though Ray's own log lies on that disk too); once there is room, resume
    trains every epoch once."""
    raw = slow_search_spec(num_samples=2, epochs=5)
    with small_disk(tmp_path / "disk", 20) as disk:
        raw["storage_path"] = str(disk)
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
        proc = start_cli(["run", "spec.yaml", "--name", "full"], cwd=tmp_path)
        wait_for(lambda: any(c.data.metrics.get("epoch", 0) >= 2 for c in runs_of(tmp_path)[2]), 300, "epoch 2", proc)
        with open(disk / "filler", "wb") as filler:  # every byte the disk has left
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
        proc.wait(timeout=300)
        out = output(proc)
        assert proc.returncode == 5, out[-4000:]
        assert "Traceback" not in out, out[-4000:]
        assert f"error: the disk of the storage path {disk} is full" in out and "cannot be written: the disk is full" in out
        client, (parent,), _ = runs_of(tmp_path)
        assert parent.info.status == "KILLED"
        line = next(line for line in out.splitlines() if line.startswith("error: the disk"))
        assert line.endswith(f" resume {parent.info.run_id} --storage-path {disk}"), line

        # Tune's last save, as it stopped, had the room the reserve held (`checkpoints.SpaceReserve`): its
        # state lists the interrupted trial, where a save cut short by the full disk would not parse.
        (state,) = disk.glob("full-*/experiment_state-*.json")  # the search's own folder
        assert len(json.loads(state.read_text())["trial_data"]) == 1
        assert not list(disk.glob(f"{checkpoints.SpaceReserve.NAME}*"))
        (disk / "filler").unlink()
        resumed = run_cli(["resume", "full", "--storage-path", str(disk)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, (parent,), children = runs_of(tmp_path)
    assert parent.info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2 and all(epoch_steps(client, c) == [1, 2, 3, 4, 5] for c in finished)


def test_a_storage_path_too_small_for_the_checkpoints_is_refused_before_any_trial(tmp_path, capsys):
    """ResNet-50 checkpoints (about 190 MiB each, 3 per running trial) against a 64 MB disk: exit 2 naming the
    path, its free space and the estimate; `validate` shows the estimate when it fits."""
    from ssl_tune.cli import main
    from ssl_tune.storage_checks import checkpoint_bytes
    from ssl_tune.spec.files import load_spec

    raw = search_spec()
    raw["backbone"] = {"name": "resnet50"}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    each = checkpoint_bytes(load_spec(spec_file))
    assert 150 * 2**20 < each < 300 * 2**20  # ResNet-50 and its projector, with LARS's momentum
    with small_disk(tmp_path / "disk", 64) as disk:
        assert main(["validate", str(spec_file), "--set", f"storage_path={disk}"]) == 2
        err = capsys.readouterr().err
        assert f"storage_path: {disk} has 0.06 GiB free" in err and "need about" in err and "MiB each" in err
    assert main(["validate", str(spec_file), "--set", f"storage_path={tmp_path}"]) == 0
    assert f"checkpoints: {each / 2**20:,.1f} MiB each" in capsys.readouterr().out


def test_an_image_cache_that_does_not_fit_its_disk_is_refused_before_decoding(tmp_path, capsys):
    from ssl_tune.cli import main

    root = image_folder(tmp_path / "images", per_class=4)
    raw = search_spec()
    with small_disk(tmp_path / "cache", 1) as cache:
        raw["data"] = {"name": "imagefolder", "root": str(root), "image_size": 512, "cache_dir": str(cache)}
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(raw))
        assert main(["prepare", str(spec_file)]) == 2
        err = capsys.readouterr().err
        assert "the cache needs 0.02 GiB (16 images x 3 x 589 x 589 bytes)" in err and str(cache) in err
        assert not list(cache.rglob("*.u8"))  # nothing decoded, no arrays left


def test_the_space_reserve_holds_room_on_a_local_storage_path_until_released(tmp_path, capsys):
    reserve, storage = checkpoints.SpaceReserve, StoragePath.of(tmp_path / "storage")
    with reserve.held(storage, 4096) as path:
        assert list((tmp_path / "storage").glob(f"{reserve.NAME}*")) == [path]
        assert path.stat().st_size == 4096
        reserve.release(storage)  # what a trial that met the full disk has the driver do
        assert not path.exists()
    with reserve.held(StoragePath.of("s3://bucket/searches"), 4096) as path:
        assert path is None  # object storage writes whole objects
    with small_disk(tmp_path / "disk", 1) as disk:
        with reserve.held(StoragePath.of(disk), 2 << 20) as path:
            assert path is None and not list(disk.glob(f"{reserve.NAME}*"))
    assert "no room for 2.0 MiB kept free for Tune's state" in capsys.readouterr().err
