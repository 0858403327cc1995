"""Checkpoint files that can be trusted: written whole or not at all, and checked before they are used.

`save` writes `checkpoint.pt` under a temporary name, reads it back to record its size and SHA-256
in `checkpoint.json`, and only then renames it into place; a write that fails (a full disk) leaves
no file behind and raises `CheckpointError` naming the path. `load` checks the file against that
record before unpickling it, so a damaged or truncated checkpoint is named with its reason, not
reported as a zip-reader error. Checkpoints written before the record existed load unchecked.

Cost: one extra sequential read per checkpoint (ResNet-50 with LARS: about 200 MB, well under a
second from the page cache), and a 150-byte JSON file beside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ssl_tune.storage_path import StoragePath

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "checkpoint.json"  # {"file", "bytes", "sha256"} of the checkpoint beside it


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, or that cannot be loaded; the message names its path."""

    def __init__(self, path: Path | str, reason: str, *, disk_full: bool = False) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path, self.reason, self.disk_full = str(path), reason, disk_full

    def __reduce__(self):  # pickled whole as it crosses a process boundary (a Ray worker's error), disk_full too
        return _checkpoint_error, (self.path, self.reason, self.disk_full)


def _checkpoint_error(path: str, reason: str, disk_full: bool) -> CheckpointError:
    return CheckpointError(path, reason, disk_full=disk_full)


def _digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def save(state: dict[str, Any], directory: Path) -> Path:
    """Write `state` to `directory/checkpoint.pt` with its record (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # through a Python file, so that the OS's own error reaches us
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the previous one
        size, sha = _digest(tmp)
        record = directory / RECORD_FILE
        record_tmp = record.with_name(record.name + ".tmp")
        record_tmp.write_text(json.dumps({"file": CHECKPOINT_FILE, "bytes": size, "sha256": sha}))
        os.replace(tmp, path)  # both written before either replaces the previous pair
        os.replace(record_tmp, record)
    except (OSError, RuntimeError) as exc:  # torch.save wraps the file's OSError in a RuntimeError
        tmp.unlink(missing_ok=True)
        (directory / (RECORD_FILE + ".tmp")).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    return path


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from or during, is a full disk or quota: by the OS's error
    number (Python's and pyarrow's OSError carry it) or a checkpoint's `CheckpointError.disk_full`, which
    keeps it across Ray's process boundary; never by the message's words."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and len(seen) < 10 and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
               or (isinstance(e, CheckpointError) and e.disk_full) for e in seen)


def write_error(path: Path | str, exc: BaseException) -> CheckpointError:
    """A failed checkpoint write as a CheckpointError; a full disk (or quota) is said in those words."""
    full = disk_full(exc)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    reason = "the disk is full" if full else f"{type(exc).__name__}: {first}"
    return CheckpointError(path, f"cannot be written: {reason}", disk_full=full)


def verify(path: Path) -> None:
    """Raise CheckpointError if `path` (a checkpoint.pt) is missing, or differs from its record."""
    if not path.is_file():
        raise CheckpointError(path, "is missing")
    record_path = path.with_name(RECORD_FILE)
    if not record_path.is_file():
        return  # written before checkpoints carried a record
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"its record {RECORD_FILE} is unreadable ({exc})") from None
    size, sha = _digest(path)
    if size != record["bytes"]:
        raise CheckpointError(path, f"is damaged: {size:,} bytes on disk, {record['bytes']:,} written")
    if sha != record["sha256"]:
        raise CheckpointError(path, "is damaged: its SHA-256 differs from the one recorded when it was written")


def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state in `path` (a checkpoint.pt or its directory), verified first; CheckpointError otherwise."""
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a file from before the record, damaged: the zip reader's error
        raise CheckpointError(path, f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random generators a resume must restore: torch's CPU generator, and `device`'s on CUDA
    (augmentation draws on the device the views are on)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the generators `rng_state` saved; a CUDA state is restored only onto a CUDA device."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# --- the light export: what `load_backbone` needs, without the optimizer state ----------------------

BACKBONE_FILE = "backbone.pt"
HEAD_FILE = "head.pt"
SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.json"
INPUT_FILE = "input.json"
EXPORT_FILES = (BACKBONE_FILE, HEAD_FILE, SPEC_FILE, INPUT_FILE, METRICS_FILE)


def write_export(out: Path, state: dict[str, Any], **about: Any) -> Path:
    """Write the export of a training state (`trainers.loop.Trainer.state_dict`) into `out`: the backbone's
    weights, the method's other weights (projector, predictor, teacher, buffers), the resolved spec, the input
    contract and the epoch's metrics, with `about` (run id, checkpoint) in metrics.json. ResNet-50 with
    TWIST's default heads: about 100 MB, against 190 MB for the full state with LARS (`checkpoint_bytes`)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    model = state["model"]
    torch.save({k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}, out / BACKBONE_FILE)
    torch.save({k: v for k, v in model.items() if not k.startswith("backbone.")}, out / HEAD_FILE)
    (out / SPEC_FILE).write_text(yaml.safe_dump(state["spec"], sort_keys=False))
    (out / INPUT_FILE).write_text(json.dumps(state["input"], indent=2))
    epoch = state["epoch"]
    metrics: dict[str, float] = next((h for h in state["history"] if int(h["epoch"]) == epoch), {})
    (out / METRICS_FILE).write_text(json.dumps({**about, "epoch": epoch, "metrics": metrics}, indent=2))
    return out


class SpaceReserve:
    """Room held on the storage path's disk for Tune's own state. Tune rewrites its experiment state in place
    every few seconds; on a disk that fills between two rewrites, the newer and larger state is cut short at
    the old one's size, and a resume would not know the trials it lists. The reserve, a file of zeros, is
    deleted the moment a trial meets the full disk (`stopping.StopWhenStorageFull`), so that Tune's last save,
    as the search stops, has room. Object storage (s3://, gs://) writes whole objects and holds none."""

    NAME = ".ssl-tune-reserve"  # then the driver's pid: searches that share a storage path hold one each

    @staticmethod
    def size(num_samples: int) -> int:
        """1 MiB plus 64 KiB a trial: the experiment state takes about 25 KB a trial, and the searcher's a few."""
        return (1 << 20) + (64 << 10) * num_samples

    @staticmethod
    def path(storage: StoragePath) -> Path | None:
        """This driver's reserve on a local storage path (as `storage_checks.check_disk_space` measures it)."""
        return storage.local / f"{SpaceReserve.NAME}-{os.getpid()}" if storage.local is not None else None

    @staticmethod
    @contextlib.contextmanager
    def held(storage: StoragePath, nbytes: int) -> Iterator[Path | None]:
        """The reserve while the block runs; yields its path (None: object storage, or no room for it)."""
        path = SpaceReserve.path(storage)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(b"\0" * nbytes)
            except OSError as exc:  # the preflight's estimate for the checkpoints still held
                path.unlink(missing_ok=True)
                print(f"warning: no room for {nbytes / 2**20:.1f} MiB kept free for Tune's state at {path.parent} ({exc});"
                      " if that disk fills, a resume may not know the trials of the last seconds", file=sys.stderr, flush=True)
                path = None
        try:
            yield path
        finally:
            SpaceReserve.release(storage)

    @staticmethod
    def release(storage: StoragePath) -> None:
        path = SpaceReserve.path(storage)
        if path is not None:
            path.unlink(missing_ok=True)
