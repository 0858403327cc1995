"""Where a search keeps its Ray Tune state: its own folder under the storage path, recorded on its MLflow
parent run (`tracking.TAG_STORAGE`), with the driver's log beside it; and what `ssl-tune resume` trusts.

A search's folder is its name plus a random suffix (`new_folder`), its confirmation stage's the same plus
`-confirm`: searches of one name, at once or one after another, never share Tune's state. Searches from
before that layout have the folder `NAME`; they resume as they are (`ssl_tune.searching.replay.check_owned` tells
their trials apart by MLflow).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from ssl_tune import tracking
from ssl_tune.report.shell import ssl_tune_command
from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.storage_path import StoragePath


def driver_log(storage: StoragePath, folder: str) -> Path:
    """Where Ray's own output goes while the search's driver runs: beside its folder (here, for object storage)."""
    return (storage.local or Path("ssl_tune_runs")) / f"{folder}.log"


def new_folder(run_name: str) -> str:
    """The search's own folder under the storage path (Tune's experiment name): its name and a random
    suffix, so that searches of one name, at once or one after another, never share Tune's state."""
    return f"{run_name}-{secrets.token_hex(4)}"


def print_namesakes(run_name: str, parent_id: str, namesakes: list, uri: str) -> None:
    """`run --name NAME` where searches of that name exist: this one starts beside them, in its own folder; the
    unfinished ones are named with the command that continues each (from its own storage path)."""
    print(f"note: {len(namesakes) + 1} searches are now named {run_name!r}; this one (run id {parent_id}) has its own "
          "Ray storage folder, and the commands printed for it name its run id", file=sys.__stdout__, flush=True)
    for run in (r for r in namesakes if r.info.status not in tracking.ENDED):
        tagged = run.data.tags.get(tracking.TAG_STORAGE, "")
        root = StoragePath.of(tagged).parent if tagged else None
        running = " (if its driver is gone)" if run.info.status == "RUNNING" else ""
        print(f"  the unfinished search {run.info.run_id} ({run.info.status}) goes on{running} with:  "
              f"{resume_command(run.info.run_id, uri, root)}", file=sys.__stdout__, flush=True)


def resume_command(parent_run_id: str, tracking_uri: str, storage: StoragePath | str | None) -> str:
    """`ssl-tune resume` for a search, naming the tracking store and the storage path where they are not the defaults."""
    uri = [] if tracking_uri == tracking.resolve_uri(None) else ["--tracking-uri", tracking_uri]
    default_storage = StoragePath.of(SpecBase.model_fields["storage_path"].default)
    storage_arg = [] if not storage or StoragePath.of(storage) == default_storage else ["--storage-path", str(storage)]
    return ssl_tune_command("resume", parent_run_id, *uri, *storage_arg)


def trusted_experiment_dir(tagged: str, storage_path: str | None, run_ref: str) -> StoragePath:
    """The Tune experiment directory a search's parent run names, if the user vouches for it.

    Resuming unpickles `tuner.pkl` from that directory, and anyone who can write tags on a shared
    tracking server could point the tag elsewhere; so the directory must sit directly in the storage
    path given on the command line (`--storage-path`), by default the spec default `ssl_tune_runs` here.
    """
    root = storage_path or SpecBase.model_fields["storage_path"].default
    given = "--storage-path " + root if storage_path else f"the default storage path ./{root}"

    parent = StoragePath.of(tagged).parent if tagged else None
    if parent is None or parent != StoragePath.of(root):
        raise SpecError(
            f"resume: the search's MLflow run names its Tune state at {tagged or '(nothing)'}, which is not in {given}; "
            "resuming unpickles that state (tuner.pkl), so ssl-tune reads it only from a storage path you name. If you "
            f"trust that directory: {ssl_tune_command('resume', run_ref, '--storage-path', str(parent or 'DIR'))}")
    return StoragePath.of(tagged)
