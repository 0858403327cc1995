"""`ssl-tune run` and `ssl-tune resume`: the Ray Tune runs of a search's stages (the search, then its
confirmation), recorded in MLflow.

The stages run in order (`_run_stages`): the search, its record, then the confirmation and its record.
The pieces it puts together live elsewhere: a stage's Tuner and the outcome (`ssl_tune.searching.stage`), the space
and the objective (`ssl_tune.searching.space`), the sampler and scheduler (`ssl_tune.searching.algorithms`), one trial
(`ssl_tune.trials.runner`), the checks before any trial (`ssl_tune.cluster`), stopping (`ssl_tune.searching.stopping`), the
search's folder of Tune state (`ssl_tune.searching.folder`), the MLflow record (`ssl_tune.tracking`) and the
console table (`ssl_tune.report.console`). `ssl_tune.api` is the Python entry point over it.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ssl_tune import cluster, process_env, storage_checks, tracking
from ssl_tune.searching import budget, folder as search_folder, race_stage, replay, warm_start
from ssl_tune.trials import checkpoints
from ssl_tune.searching.algorithms import build_scheduler, build_search_algorithm
from ssl_tune.searching.confirmation import confirmation_points
from ssl_tune.moved_modules import moved_attribute
from ssl_tune.searching.space import field_values
from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.searching.stage import SearchOutcome, Stage, search_dirname, search_folder_of, trainable
from ssl_tune.searching.stopping import StopSignals, storage_full_message
from ssl_tune.storage_path import StoragePath
from ssl_tune.trials.runner import FAILURE_KEY
from trainers import spec_model
from trainers.build import check_backbone


@contextlib.contextmanager
def _console(log_path: Path, verbose: bool):
    """Quiet by default: Ray's own output goes to `log_path`, the console shows our table."""
    if verbose:
        yield
        return
    import ray  # noqa: F401  (its loggers must exist before they are redirected)

    from ssl_tune.report.console import ray_output_to

    print(f"Ray's own output: {log_path}  (--verbose shows it here)", flush=True)
    with ray_output_to(log_path):
        yield


@contextlib.contextmanager
def _started(uri: str):
    """The start-up `run` and `resume` share: the tracking store answers, and the process settings a search
    needs while it runs (`process_env.search_settings`: bounded HTTP retries for every MLflow call after)."""
    tracking.check_reachable(uri)
    with process_env.search_settings():
        yield


def _prepared(spec: SpecBase, storage: StoragePath, uri: str, address: str | None, verbose: bool) -> tuple[str, Any, int]:
    """Ray connected, the cluster checked and its data prepared, room on the storage path for the checkpoints:
    (Ray's address, the data cache, how many trials run at once)."""
    ray_address, fits, data = cluster.prepare_cluster(spec, storage, uri, address, verbose)
    max_concurrent = cluster.trials_at_once(spec, fits)
    storage_checks.check_disk_space(spec, storage, max_concurrent)
    return ray_address, data, max_concurrent


def run_search(spec: SpecBase, *, spec_source: str, name: str | None = None, address: str | None = None,
               verbose: bool = False, tracking_uri: str | None = None) -> SearchOutcome:
    """Run the whole search of `spec` and record it in MLflow (at `tracking_uri`, else the spec's
    `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db); returns the leaderboard."""
    if spec.is_resolved:
        raise SpecError(f"invalid spec {spec_source}: it has no search ranges; use `ssl-tune train` for one configuration")
    check_backbone(spec)  # a backbone that cannot take the data's images fails here, not in every trial
    if spec.confirmation_spec() is not spec:
        check_backbone(spec.confirmation_spec())  # (at the confirmation's setting too, not after the search)
    run_name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.resolve_uri(tracking_uri or spec.mlflow.tracking_uri)
    storage = StoragePath.of(spec.storage_path)
    folder = search_folder.new_folder(run_name)
    with _started(uri), _console(search_folder.driver_log(storage, folder), verbose):
        stage, tuner = _new_search(spec, spec_source, run_name, folder, uri, storage, address, verbose)
        return _run_stages(stage, tuner, confirming=False, resumed=False)


def _new_search(spec: SpecBase, spec_source: str, run_name: str, folder: str, uri: str, storage: StoragePath,
                address: str | None, verbose: bool) -> tuple[Stage, Any]:
    """A new search's parent run and its search stage's Tuner."""
    from ray import tune

    from ssl_tune.report.console import ConsoleTable

    experiment_name = spec.mlflow.experiment_name or spec.name
    client = tracking.client_for(uri)
    warm = warm_start.gather(spec, client, uri)  # an unknown earlier search fails here, before Ray starts
    ray_address, data, max_concurrent = _prepared(spec, storage, uri, address, verbose)
    if _data_fields(spec.confirmation_spec()) != _data_fields(spec):
        # The confirmation's data too, before any trial: decoding it after the search would leave the GPUs idle.
        cluster.prepare_data(spec.confirmation_spec(), cluster.node_resources(), stream=sys.__stdout__)

    experiment = tracking.experiment_id(client, experiment_name)
    namesakes = tracking.searches_named(client, run_name)
    parent_id = tracking.open_search_run(client, experiment, run_name, spec, spec_source=spec_source,
                                         ray_address=ray_address, experiment_dir=str(storage / folder),
                                         max_concurrent=max_concurrent, data=data)
    if namesakes:
        search_folder.print_namesakes(run_name, parent_id, namesakes, uri)
    if warm.lines:
        print("warm start:\n  " + "\n  ".join(warm.lines), file=sys.__stdout__, flush=True)
        tracking.record_warm_start(client, parent_id, warm)
    stage = Stage(spec=spec, data=data, client=client, parent_id=parent_id, experiment_id=experiment,
                  experiment_name=experiment_name, uri=uri, storage=storage, folder=folder, verbose=verbose,
                  max_concurrent=max_concurrent, origins=warm.origins)
    tuner = stage.tuner(
        folder,
        tune.TuneConfig(search_alg=build_search_algorithm(spec, max_concurrent, warm), scheduler=build_scheduler(spec),
                        num_samples=spec.search.num_samples, trial_dirname_creator=search_dirname,
                        reuse_actors=True),  # a new trial reuses a finished trial's process: no fresh imports
        ConsoleTable(spec, epochs_after=budget.confirmation_cost(spec, data)))
    return stage, tuner


def resume_search(experiment_or_run: str, *, tracking_uri: str | None = None, address: str | None = None,
                  verbose: bool = False, storage_path: str | None = None) -> SearchOutcome:
    """Continue an interrupted search: unfinished trials resume from their checkpoints, the remaining
    samples run, finished trials are kept; the same MLflow parent and child runs are used."""
    uri = tracking.resolve_uri(tracking_uri)
    with _started(uri):
        return _resume(experiment_or_run, uri, address, verbose, storage_path)


def _resume(experiment_or_run: str, uri: str, address: str | None, verbose: bool, storage_path: str | None) -> SearchOutcome:
    """The stopped search's parent run, spec and Tune state, checked before Ray starts; then its stages."""
    from ray import tune

    client = tracking.client_for(uri)
    try:
        parent = tracking.find_parent_run(client, experiment_or_run, unfinished=True)
    except LookupError as exc:
        raise SpecError(f"resume: {exc} in {uri}") from None
    parent_id = parent.info.run_id
    if parent.info.status in tracking.ENDED:
        raise SpecError(f"resume: search {parent.info.run_name!r} ({parent_id}) already ended ({parent.info.status}); "
                        "nothing to resume")
    tagged = parent.data.tags.get(tracking.TAG_STORAGE, "")
    storage = search_folder.trusted_experiment_dir(tagged, storage_path, experiment_or_run)
    confirming = parent.data.tags.get(tracking.TAG_STAGE) == tracking.KIND_CONFIRMATION
    if not tune.Tuner.can_restore(str(storage)):
        raise SpecError(f"resume: no Tune experiment state at {str(storage)!r} for search {parent.info.run_name!r}; "
                        "it was removed, or the search stopped before its first trial started")
    replay.check_state_owned(client, parent, storage)  # before Ray starts: a folder two searches shared is refused
    with tempfile.TemporaryDirectory() as tmp:
        spec_text = Path(client.download_artifacts(parent_id, "spec.yaml", tmp)).read_text()
    search_spec = spec_model().model_validate(yaml.safe_load(spec_text))
    # The confirmation stage's trials train the spec with `search.confirm.overrides` (`_confirmation_stage`).
    spec = search_spec.confirmation_spec() if confirming else search_spec
    root, name = storage.parent, storage.name
    with _console(search_folder.driver_log(root, name), verbose):
        _, data, max_concurrent = _prepared(spec, root, uri, address, verbose)
        tracking.reopen_search_run(client, parent)
        # tuner.pkl is a pickle: `trusted_experiment_dir` checked that it lies where the user said.
        # A confirmation stopped before its first round's Tuner has none to restore (the tag names the search's).
        folder, in_round = search_folder_of(name)
        tuner = None if confirming and not in_round else tune.Tuner.restore(
            str(storage), trainable=trainable(spec, data, uri, parent_id), resume_unfinished=True, resume_errored=False,
            restart_errored=False)
        stage = Stage(spec=spec, data=data, client=client, parent_id=parent_id,
                      experiment_id=parent.info.experiment_id,
                      experiment_name=client.get_experiment(parent.info.experiment_id).name, uri=uri, storage=root,
                      # (a search from before each had its own folder: its confirmation gets one of its own)
                      folder=folder if folder != parent.info.run_name else search_folder.new_folder(folder),
                      verbose=verbose, max_concurrent=max_concurrent,
                      search_spec=search_spec)
        return _run_stages(stage, tuner, confirming=confirming, resumed=True)


def _run_stages(stage: Stage, tuner, *, confirming: bool, resumed: bool) -> SearchOutcome:
    """The search's stages, in order: the search and its record; then, when it finished with
    `search.confirm.top_k`, the confirmation stage, raced in rounds, and its record. A resumed search enters at
    the stage it stopped in, and a resumed stage first completes its record from Tune's files
    (`ssl_tune.searching.replay`). An interrupted stage closes its MLflow runs KILLED, ready for `ssl-tune resume`."""
    if not confirming:
        results, interrupted = _fit(tuner, stage, resumed=resumed)
        with _tracking_complete(stage):
            outcome, points = _record_search(results, stage, interrupted)
            if outcome is not None:  # (no confirmation stage)
                return outcome
            stage = _confirmation_stage(stage)
            race_stage.open_race(stage, points)
        tuner, resumed = None, False
    return _race(stage, tuner, resumed=resumed)


def _race(stage: Stage, tuner, *, resumed: bool) -> SearchOutcome:
    """The confirmation's rounds until the race is decided (`ssl_tune.searching.racing`): each round's runs reused
    from the store where they can be, the rest trained by one Tuner. `tuner`: a resumed round's. A signal between
    rounds stops the race there, as one during a round does."""
    attempted: set[tuple[str, int]] = set()
    with StopSignals(outside_tune=True).installed() as between:
        while True:
            if tuner is not None:
                _, interrupted = _fit(tuner, stage, resumed=resumed)
                if interrupted or between.received:
                    with _tracking_complete(stage):
                        return _record_confirmation(stage, interrupted=True)
            with _tracking_complete(stage):
                race = race_stage.race_so_far(stage, attempted)
                configs = [] if race.done else race_stage.next_round(stage, race, attempted)
                if between.received:
                    return _record_confirmation(stage, interrupted=True)
                if race.done:
                    return _record_confirmation(stage, interrupted=False)
                attempted |= {(c["of"], c["seed"]) for c in configs}
                tuner, resumed = (race_stage.round_tuner(stage, configs) if configs else None), False


def _fit(tuner, stage: Stage, *, resumed: bool) -> tuple[Any, bool]:
    """Run one stage's Tuner: (its results, whether a signal stopped it). A stage stopped by a full disk
    raises `replay.StorageFull`; a tracking server away at the end raises `replay.TrackingIncomplete`."""
    stop = StopSignals()
    tracking.updates_given_up(reset=True)
    started = time.time()
    reserve = checkpoints.SpaceReserve.held(stage.storage, checkpoints.SpaceReserve.size(stage.spec.search.num_samples))
    try:
        with stop.installed(), reserve:
            results = tuner.fit()
    except BaseException as exc:
        with contextlib.suppress(*replay.tracking_errors()):  # the record stays RUNNING; resume closes it
            tracking.close_search_run(stage.client, stage.parent_id, interrupted=True)
        if checkpoints.disk_full(exc):  # Tune could not write its own state there: one line, not its traceback
            raise replay.StorageFull(stage.storage, stage.parent_id, stage.uri, str(exc).splitlines()[0][:300]) from None
        raise
    full = storage_full_message(results, since=started)
    if full is not None:  # a trial met a full disk and the search was stopped for it (`StopWhenStorageFull`)
        with contextlib.suppress(*replay.tracking_errors()):
            tracking.close_search_run(stage.client, stage.parent_id, interrupted=True)
        raise replay.StorageFull(stage.storage, stage.parent_id, stage.uri, full)
    # Tune counts trials it stopped on a signal as TERMINATED, like finished ones: the signal decides.
    interrupted = stop.received is not None
    with _tracking_complete(stage):
        given_up = tracking.updates_given_up()
        if given_up and interrupted:
            raise ConnectionError(f"{given_up} updates held past the end of the stage")
        if (resumed or given_up) and not interrupted:  # what this or an earlier driver could not give MLflow
            replay.replay(results, stage.trial_logger())
    return results, interrupted


@contextlib.contextmanager
def _tracking_complete(stage: Stage):
    """A tracking server away while the record is written: nothing is lost (Tune's files hold every result
    and checkpoint, and resume replays them); `replay.TrackingIncomplete` says so."""
    try:
        yield
    except replay.tracking_errors() as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise replay.TrackingIncomplete(stage.uri, stage.parent_id, stage.storage,
                                        f"{type(exc).__name__}: {first}") from None


def _record_search(results, stage: Stage, interrupted: bool) -> tuple[SearchOutcome | None, list[tuple[str, dict[str, Any]]]]:
    """Close the search stage's record: (its outcome, or the configurations its confirmation races)."""
    spec, client, parent_id = stage.spec, stage.client, stage.parent_id
    ok = sum(r.error is None and FAILURE_KEY not in (r.metrics or {}) for r in results)
    done = results.num_terminated + results.num_errors
    if interrupted:
        done = _ended_on_their_own(client, parent_id, tracking.KIND_TRIAL)
        rows, _ = tracking.close_search_run(client, parent_id, interrupted=True, spec=spec)
        return stage.outcome(rows, None, interrupted=True, trials_done=done, trials_ok=ok), []
    confirm = bool(spec.search.confirm.top_k) and ok > 0
    rows, best = tracking.close_search_run(client, parent_id, interrupted=False, spec=spec, trials_ok=ok,
                                           confirming=confirm)
    if not confirm:
        return stage.outcome(rows, best, trials_done=done, trials_ok=ok), []
    configs = {r.metrics["trial_id"]: field_values(r.config) for r in results if r.metrics and "trial_id" in r.metrics}
    return None, confirmation_points(spec, rows, configs)


def _ended_on_their_own(client, parent_id: str, kind: str) -> int:
    """Trials of a stopped stage that ended before the stop: their runs are closed (the rest still RUNNING)."""
    return sum(run.info.status != "RUNNING" for run in tracking.child_runs(client, client.get_run(parent_id), kind))


def _confirmation_stage(stage: Stage) -> Stage:
    """The confirmation stage's view of `stage`: its trials train `spec.confirmation_spec()` (the search's spec
    with `search.confirm.overrides`). Data the overrides change (another image size, another data set) was
    prepared before the search; here every node checks it again (a node may have joined since)."""
    confirming = stage.spec.confirmation_spec()
    if confirming is stage.spec:
        return replace(stage, search_spec=stage.spec)
    data = stage.data
    if _data_fields(confirming) != _data_fields(stage.spec):
        data = cluster.prepare_data(confirming, cluster.node_resources(), stream=sys.__stdout__)
    return replace(stage, spec=confirming, data=data, search_spec=stage.spec)


def _data_fields(spec: SpecBase) -> dict[str, Any]:
    """What decides the data cache (the subset is drawn by each trial from the same cache)."""
    return spec.data.model_dump(mode="json", exclude={"subset", "subset_seed", "augmentation", "on_device"})


def _record_confirmation(stage: Stage, interrupted: bool) -> SearchOutcome:
    client, parent_id = stage.client, stage.parent_id
    parent = client.get_run(parent_id)
    rows = tracking.leaderboard(client, parent)
    ok = sum(r["status"] != tracking.FAILED for r in rows)
    common = dict(trials_done=len(rows), trials_ok=ok)
    if interrupted:  # stopped during the confirmation stage (Ctrl-C, SIGTERM)
        common["trials_done"] = _ended_on_their_own(client, parent_id, tracking.KIND_CONFIRMATION)
        tracking.close_search_run(client, parent_id, interrupted=True)
        return stage.outcome(rows, None, interrupted=True, in_confirmation=True, **common)
    table, verdict, winner = tracking.record_confirmation(client, parent_id, stage.spec)
    return stage.outcome(rows, winner, confirmation=table, verdict=verdict, **common)


def __getattr__(name: str) -> Any:  # what an earlier version's saved Tune state names here (`moved_modules`)
    return moved_attribute(__name__, name)
