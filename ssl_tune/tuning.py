"""`ssl-tune run` and `ssl-tune resume`: the Ray Tune runs of a search's stages (the search, then its
confirmation), recorded in MLflow.

The pieces it puts together live elsewhere: the space and the objective (`ssl_tune.space`), the sampler
and scheduler (`ssl_tune.algorithms`), one trial (`ssl_tune.trial`), the checks before any trial
(`ssl_tune.cluster`), stopping (`ssl_tune.stopping`), the search's folder of Tune state
(`ssl_tune.search_folder`), the MLflow record (`ssl_tune.tracking`) and the console table
(`ssl_tune.console`). `ssl_tune.api` is the Python entry point over it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ssl_tune import budget, checkpoints, cluster, replay, search_folder, tracking, warm_start
from ssl_tune.algorithms import build_scheduler, build_search_algorithm
from ssl_tune.confirmation import confirmation_configs
from ssl_tune.space import CONFIRMATION_KEY, SEARCH_RUN_KEY, field_values
from ssl_tune.spec import SpecBase, SpecError
from ssl_tune.stopping import StopSignals, StopWhenStorageFull, space_reserve, storage_full
from ssl_tune.storage_path import StoragePath
from ssl_tune.trial import FAILURE_KEY, checkpoint_config, run_trial
from trainers import spec_model
from trainers.loop import check_backbone


@contextlib.contextmanager
def _console(log_path: Path, verbose: bool):
    """Quiet by default: Ray's own output goes to `log_path`, the console shows our table."""
    if verbose:
        yield
        return
    import ray  # noqa: F401  (its loggers must exist before they are redirected)

    from ssl_tune.console import ray_output_to

    print(f"Ray's own output: {log_path}  (--verbose shows it here)", flush=True)
    with ray_output_to(log_path):
        yield


@dataclass
class SearchOutcome:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    metric: str  # the objective, as the search's spec set it: what every ranking of its trials uses
    mode: str
    rows: list[dict[str, Any]]
    best_run_id: str | None
    interrupted: bool = False
    trials_done: int = 0
    trials_ok: int = 0  # finished or stopped early by ASHA; not failed, diverged or stopped on bad data
    storage: str = ""  # the storage path holding the search's Tune state
    confirmation: list[dict[str, Any]] = field(default_factory=list)  # `tracking.confirmation_table`
    verdict: str = ""  # whether the confirmed winner beats the default beyond seed noise
    in_confirmation: bool = False  # interrupted during the confirmation stage

    @property
    def all_failed(self) -> bool:
        return not self.interrupted and self.trials_ok == 0


def _trainable(spec: SpecBase, data, uri: str, parent_run_id: str):
    """The Tune trainable; trials map the data cache whose source fingerprint the driver checked (`data`), and
    write their system metrics and exports to their runs under the search's parent run (`ssl_tune.trial_record`)."""
    from ray import tune

    fingerprint = data.manifest["fingerprint"] if data is not None else None
    record = {"uri": uri, "parent_run_id": parent_run_id}
    return tune.with_resources(tune.with_parameters(run_trial, base_spec=spec.model_dump(mode="json"),
                                                    data_fingerprint=fingerprint, record=record),
                               cluster.tune_trial_resources(spec))


@dataclass(kw_only=True)
class _Stage:
    """What the search's stages share: the spec, the data, the MLflow parent run and where Tune keeps state."""

    spec: SpecBase
    data: Any
    client: Any
    parent_id: str
    experiment_id: str
    experiment_name: str
    uri: str
    storage: StoragePath
    folder: str  # the search's own folder under `storage` (`search_folder`); its confirmation's is FOLDER-confirm
    verbose: bool
    max_concurrent: int
    origins: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # `space.origin`'s points
    search_spec: SpecBase | None = None  # in the confirmation stage: the search's spec (`spec` has the overrides)

    def trial_logger(self) -> tracking.MlflowTrialLogger:
        return tracking.MlflowTrialLogger(self.uri, self.experiment_id, self.parent_id, self.spec, origins=self.origins)

    def outcome(self, rows: list[dict[str, Any]], best_run_id: str | None, **more: Any) -> SearchOutcome:
        return SearchOutcome(self.experiment_name, self.parent_id, self.uri, self.spec.search.metric,
                             self.spec.search.mode, rows, best_run_id, storage=str(self.storage), **more)

    def tuner(self, name: str, tune_config, console, param_space: dict[str, Any] | None = None):
        """The Tuner of one stage (`name`: its directory under the storage path); `console` is the compact
        table shown unless `verbose`."""
        from ray import tune

        return tune.Tuner(
            _trainable(self.spec, self.data, self.uri, self.parent_id),
            param_space={**(param_space or {}), SEARCH_RUN_KEY: self.parent_id},  # (constant in every trial's config)
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(self.storage),
                callbacks=[self.trial_logger(), StopWhenStorageFull()] + ([] if self.verbose else [console]),
                checkpoint_config=checkpoint_config(train=False),
                # A trial whose worker died restarts from its latest checkpoint, in the same MLflow run.
                failure_config=tune.FailureConfig(max_failures=self.spec.search.max_failures),
                verbose=1 if self.verbose else 0,
            ),
        )


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
    tracking.check_reachable(uri)
    tracking.bound_http_retries()
    storage = StoragePath.of(spec.storage_path)
    folder = search_folder.new_folder(run_name)
    with _console(search_folder.driver_log(storage, folder), verbose):
        return _start_search(spec, spec_source, run_name, folder, uri, storage, address, verbose)


def _start_search(spec: SpecBase, spec_source: str, run_name: str, folder: str, uri: str, storage: StoragePath,
                  address: str | None, verbose: bool) -> SearchOutcome:
    from ray import tune

    from ssl_tune.console import ConsoleTable

    experiment_name = spec.mlflow.experiment_name or spec.name
    client = tracking.client_for(uri)
    warm = warm_start.gather(spec, client, uri)  # an unknown earlier search fails here, before Ray starts
    ray_address, fits, data = cluster.prepare_cluster(spec, storage, uri, address, verbose)
    if _data_fields(spec.confirmation_spec()) != _data_fields(spec):
        # The confirmation's data too, before any trial: decoding it after the search would leave the GPUs idle.
        cluster.prepare_data(spec.confirmation_spec(), cluster.node_resources(), stream=sys.__stdout__)
    max_concurrent = min(spec.search.max_concurrent or fits, spec.search.num_samples)
    cluster.check_disk_space(spec, storage, max_concurrent)

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
    stage = _Stage(spec=spec, data=data, client=client, parent_id=parent_id, experiment_id=experiment,
                   experiment_name=experiment_name, uri=uri, storage=storage, folder=folder, verbose=verbose,
                   max_concurrent=max_concurrent, origins=warm.origins)
    tuner = stage.tuner(
        folder,
        tune.TuneConfig(search_alg=build_search_algorithm(spec, max_concurrent, warm), scheduler=build_scheduler(spec),
                        num_samples=spec.search.num_samples, trial_dirname_creator=_search_dirname,
                        reuse_actors=True),  # a new trial reuses a finished trial's process: no fresh imports
        ConsoleTable(spec, epochs_after=budget.confirmation_cost(spec, data)))
    return _fit_and_record(tuner, stage, confirming=False)


def resume_search(experiment_or_run: str, *, tracking_uri: str | None = None, address: str | None = None,
                  verbose: bool = False, storage_path: str | None = None) -> SearchOutcome:
    """Continue an interrupted search: unfinished trials resume from their checkpoints, the remaining
    samples run, finished trials are kept; the same MLflow parent and child runs are used."""
    from ray import tune

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    tracking.bound_http_retries()
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
        _, fits, data = cluster.prepare_cluster(spec, root, uri, address, verbose)
        max_concurrent = min(spec.search.max_concurrent or fits, spec.search.num_samples)
        cluster.check_disk_space(spec, root, max_concurrent)
        tracking.reopen_search_run(client, parent)
        # tuner.pkl is a pickle: `trusted_experiment_dir` checked that it lies where the user said.
        tuner = tune.Tuner.restore(str(storage), trainable=_trainable(spec, data, uri, parent_id), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        stage = _Stage(spec=spec, data=data, client=client, parent_id=parent_id,
                       experiment_id=parent.info.experiment_id,
                       experiment_name=client.get_experiment(parent.info.experiment_id).name, uri=uri, storage=root,
                       # (a search from before each had its own folder: its confirmation gets one of its own)
                       folder=name if name != parent.info.run_name else search_folder.new_folder(name),
                       verbose=verbose, max_concurrent=max_concurrent,
                       search_spec=search_spec)
        return _fit_and_record(tuner, stage, confirming=confirming, resumed=True)


def _fit_and_record(tuner, stage: _Stage, *, confirming: bool, resumed: bool = False) -> SearchOutcome:
    """Run the Tuner (the search, or with `confirming` its confirmation stage); then close the MLflow
    runs: the leaderboard if the stage finished, else every unfinished trial's run KILLED and the
    parent KILLED, ready for `ssl-tune resume`. A finished search with `search.confirm.top_k` goes
    on to the confirmation stage. A resumed stage first completes the record from Tune's files
    (`ssl_tune.replay`); a tracking server away at the end raises `replay.TrackingIncomplete`."""
    # Tune saves its experiment state every 10 s or more ("auto"), and after every second checkpoint of a
    # trial when two are kept: a driver killed in between loses the trials started since, which a resume
    # then proposes again. Every 2 s keeps that window short (about 25 KB a trial; $TUNE_GLOBAL_CHECKPOINT_S wins).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Epochs between evaluations (`evaluation.eval_every`) report no objective; ASHA and Optuna act on
    # the evaluated ones only, and Tune must not refuse the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    stop = StopSignals()
    tracking.updates_given_up(reset=True)
    storage_full.clear()
    try:
        reserve = space_reserve.held(stage.storage, checkpoints.SpaceReserve.size(stage.spec.search.num_samples))
        with stop.installed(), reserve:
            results = tuner.fit()
    except BaseException as exc:
        with contextlib.suppress(*replay.tracking_errors()):  # the record stays RUNNING; resume closes it
            tracking.close_search_run(stage.client, stage.parent_id, interrupted=True)
        if checkpoints.disk_full(exc):  # Tune could not write its own state there: one line, not its traceback
            raise replay.StorageFull(stage.storage, stage.parent_id, stage.uri, str(exc).splitlines()[0][:300]) from None
        raise
    if storage_full:  # a trial met a full disk and the search was stopped for it (`StopWhenStorageFull`)
        with contextlib.suppress(*replay.tracking_errors()):
            tracking.close_search_run(stage.client, stage.parent_id, interrupted=True)
        raise replay.StorageFull(stage.storage, stage.parent_id, stage.uri, storage_full[0])
    # Tune counts trials it stopped on a signal as TERMINATED, like finished ones: the signal decides.
    interrupted = stop.received is not None
    try:
        given_up = tracking.updates_given_up()
        if given_up and interrupted:
            raise ConnectionError(f"{given_up} updates held past the end of the stage")
        if (resumed or given_up) and not interrupted:  # what this or an earlier driver could not give MLflow
            replay.replay(results, stage.trial_logger())
        return _record(results, stage, confirming=confirming, interrupted=interrupted)
    except replay.tracking_errors() as exc:
        # Nothing is lost: Tune's files hold every result and checkpoint, and resume replays them.
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise replay.TrackingIncomplete(stage.uri, stage.parent_id, stage.storage,
                                        f"{type(exc).__name__}: {first}") from None


def _record(results, stage: _Stage, *, confirming: bool, interrupted: bool) -> SearchOutcome:
    spec, client, parent_id = stage.spec, stage.client, stage.parent_id
    if confirming:
        return _record_confirmation(stage, interrupted)
    ok = sum(r.error is None and FAILURE_KEY not in (r.metrics or {}) for r in results)
    done = results.num_terminated + results.num_errors
    if interrupted:
        done = _ended_on_their_own(client, parent_id, tracking.KIND_TRIAL)
        rows, _ = tracking.close_search_run(client, parent_id, interrupted=True, spec=spec)
        return stage.outcome(rows, None, interrupted=True, trials_done=done, trials_ok=ok)
    confirm = bool(spec.search.confirm.top_k) and ok > 0
    rows, best = tracking.close_search_run(client, parent_id, interrupted=False, spec=spec, trials_ok=ok,
                                           confirming=confirm)
    if not confirm:
        return stage.outcome(rows, best, trials_done=done, trials_ok=ok)
    configs = {r.metrics["trial_id"]: field_values(r.config) for r in results if r.metrics and "trial_id" in r.metrics}
    return _confirm(confirmation_configs(spec, rows, configs), stage)


def _ended_on_their_own(client, parent_id: str, kind: str) -> int:
    """Trials of a stopped stage that ended before the stop: their runs are closed (the rest still RUNNING)."""
    return sum(run.info.status != "RUNNING" for run in tracking.child_runs(client, client.get_run(parent_id), kind))


def _confirm(configs: list[dict[str, Any]], stage: _Stage) -> SearchOutcome:
    """The confirmation stage: every config (a configuration and a fresh seed) as an ordinary trial
    of a second Tuner, in parallel, at the full budget and without early stopping, logged as child
    runs of the same parent; the parent names this Tuner's directory, so `ssl-tune resume` continues it."""
    from ray import tune

    from ssl_tune.console import ConsoleTable

    stage = _confirmation_stage(stage)
    spec, name = stage.spec, f"{stage.folder}-confirm"
    confirm = spec.search.confirm
    at = f", at {_overrides_text(stage.search_spec)}" if stage.search_spec.search.confirm.overrides else ""
    print(f"\nconfirmation: the {confirm.top_k} best configuration(s){' and the default' if confirm.default else ''} "
          f"re-trained on {confirm.seeds} fresh seeds ({len(configs)} trials of {spec.training.epochs} epochs{at})",
          file=sys.__stdout__, flush=True)
    stage.client.set_tag(stage.parent_id, tracking.TAG_STORAGE, str(stage.storage / name))
    stage.client.set_tag(stage.parent_id, tracking.TAG_CONFIRMATION_TRIALS, str(len(configs)))
    tuner = stage.tuner(
        name,
        tune.TuneConfig(num_samples=1, max_concurrent_trials=min(stage.max_concurrent, len(configs)),
                        reuse_actors=True, trial_dirname_creator=_confirmation_dirname),
        ConsoleTable(spec, num_samples=len(configs), early_stopping=False),
        param_space={CONFIRMATION_KEY: tune.grid_search([c[CONFIRMATION_KEY] for c in configs])})
    return _fit_and_record(tuner, stage, confirming=True)


def _confirmation_stage(stage: _Stage) -> _Stage:
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


def _overrides_text(spec: SpecBase) -> str:
    return ", ".join(f"{path} {value}" for path, value in spec.search.confirm.overrides.items())


def _search_dirname(trial) -> str:
    """Tune would name a trial's directory after its whole config, the search's run id included: keep it short
    (the values are in the trial's params.json and its MLflow run)."""
    return f"run_trial_{trial.trial_id}"


def _confirmation_dirname(trial) -> str:
    """Tune names a trial's directory after its config, here a whole dict of values: keep it short."""
    c = trial.config[CONFIRMATION_KEY]
    return f"confirm_{trial.trial_id}_{c['of'][:8]}_seed{c['seed']}"


def _record_confirmation(stage: _Stage, interrupted: bool) -> SearchOutcome:
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
