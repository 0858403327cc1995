"""One stage of a search as Ray Tune runs it (the search, then its confirmation): what the stages share
(`Stage`), the trainable and the Tuner, the names of the trials' directories, and a search's outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssl_tune import cluster, tracking
from ssl_tune.searching.space import CONFIRMATION_KEY, SEARCH_RUN_KEY
from ssl_tune.spec import SpecBase
from ssl_tune.searching.stopping import StopWhenStorageFull
from ssl_tune.storage_path import StoragePath
from ssl_tune.trials.runner import checkpoint_config, run_trial


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


def trainable(spec: SpecBase, data, uri: str, parent_run_id: str):
    """The Tune trainable; trials map the data cache whose source fingerprint the driver checked (`data`), and
    write their system metrics and exports to their runs under the search's parent run (`ssl_tune.trials.uploads`)."""
    from ray import tune

    fingerprint = data.manifest["fingerprint"] if data is not None else None
    record = {"uri": uri, "parent_run_id": parent_run_id}
    return tune.with_resources(tune.with_parameters(run_trial, base_spec=spec.model_dump(mode="json"),
                                                    data_fingerprint=fingerprint, record=record),
                               cluster.tune_trial_resources(spec))


@dataclass(kw_only=True)
class Stage:
    """What the search's stages share: the spec, the data, the MLflow parent run and where Tune keeps state."""

    spec: SpecBase
    data: Any
    client: Any
    parent_id: str
    experiment_id: str
    experiment_name: str
    uri: str
    storage: StoragePath
    folder: str  # the search's own folder under `storage` (`search_folder`); its confirmation rounds' FOLDER-confirm-rN
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
            trainable(self.spec, self.data, self.uri, self.parent_id),
            param_space={**(param_space or {}), SEARCH_RUN_KEY: self.parent_id},  # (constant in every trial's config)
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(self.storage),
                callbacks=[self.trial_logger(), StopWhenStorageFull(self.storage)] + ([] if self.verbose else [console]),
                checkpoint_config=checkpoint_config(train=False),
                # A trial whose worker died restarts from its latest checkpoint, in the same MLflow run.
                failure_config=tune.FailureConfig(max_failures=self.spec.search.max_failures),
                verbose=1 if self.verbose else 0,
            ),
        )


CONFIRM_FOLDER = "-confirm"  # a confirmation round's folder is the search's folder, this, and "-rN"


def search_folder_of(name: str) -> tuple[str, bool]:
    """(the search's folder, whether `name` is a confirmation round's folder: FOLDER-confirm-rN, or FOLDER-confirm
    before racing)."""
    import re

    found = re.fullmatch(rf"(.+){CONFIRM_FOLDER}(-r\d+)?", name)
    return (found.group(1), True) if found else (name, False)


def search_dirname(trial) -> str:
    """Tune would name a trial's directory after its whole config, the search's run id included: keep it short
    (the values are in the trial's params.json and its MLflow run)."""
    return f"run_trial_{trial.trial_id}"


def confirmation_dirname(trial) -> str:
    """Tune names a trial's directory after its config, here a whole dict of values: keep it short."""
    c = trial.config[CONFIRMATION_KEY]
    return f"confirm_{trial.trial_id}_{c['of'][:8]}_seed{c['seed']}"
