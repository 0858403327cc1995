"""The Python API of a search, for notebooks and scripts; the `ssl-tune` commands call it.

    import ssl_tune

    found = ssl_tune.search("search_spaces/twist.yaml", overrides={"training.epochs": 3})
    found.leaderboard()                       # a pandas DataFrame, best first
    found.best                                # the run export takes, its objective and searched values
    backbone, preprocess = found.load_backbone()

    earlier = ssl_tune.open_search("twist-20261201-101500")   # by name or parent run id

Modelled on Ray Tune's `Tuner.fit()` -> `ResultGrid` and Optuna's `Study`: one object per search, read
from the tracking store each time, so it shows a search that is still running as it is now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_tune import tracking
from ssl_tune.searching.space import param_value

if TYPE_CHECKING:
    import pandas

    from ssl_tune.export import Pretrained
    from ssl_tune.spec import SpecBase
    from ssl_tune.searching.driver import SearchOutcome


@dataclass(frozen=True)
class BestTrial:
    """The run a search's export takes: after a confirmation stage the confirmed winner's best seed, else the
    search's best trial (`space.best_trial`)."""

    run_id: str
    objective: float
    params: dict[str, Any]  # its searched values
    confirmed: bool  # a confirmation run (retrained on a fresh seed), not a search trial


class Search:
    """One search in an MLflow tracking store: its trials, best run and confirmation stage."""

    def __init__(self, parent_run_id: str, tracking_uri: str, outcome: SearchOutcome | None = None) -> None:
        self.run_id, self.tracking_uri = parent_run_id, tracking_uri
        self.outcome = outcome  # how the run that this process started ended (None for `open_search`)
        self._store = None

    @property
    def _client(self):
        if self._store is None:
            self._store = tracking.existing_store_client(self.tracking_uri)
        return self._store

    def __repr__(self) -> str:
        return f"Search({self.name!r}, run_id={self.run_id!r}, status={self.status!r})"

    @property
    def _parent(self):
        return self._client.get_run(self.run_id)

    @property
    def name(self) -> str:
        return self._parent.info.run_name

    @property
    def experiment(self) -> str:
        return self._client.get_experiment(self._parent.info.experiment_id).name

    @property
    def status(self) -> str:
        """The parent run's MLflow status: RUNNING, FINISHED, FAILED (no trial came through) or KILLED (interrupted)."""
        return self._parent.info.status

    @property
    def metric(self) -> str:
        return tracking.objective_of(self._parent)[0]

    @property
    def mode(self) -> str:
        return tracking.objective_of(self._parent)[1]

    def trials(self) -> list[dict[str, Any]]:
        """One dict per search trial, best objective first: rank, trial_id, run_id, the searched values,
        objective, status (finished, stopped early by ASHA, interrupted, failed, running), epochs, duration_s."""
        return tracking.leaderboard(self._client, self._parent)

    def leaderboard(self) -> pandas.DataFrame:
        """`trials()` as a DataFrame: the columns `ssl-tune results --out` writes to Parquet."""
        import pandas

        return pandas.DataFrame(self.trials())

    @property
    def best(self) -> BestTrial | None:
        """The run `export` takes, or None while no trial has a result."""
        parent = self._parent
        run_id = tracking.best_trial_run_id(self._client, parent)
        if run_id is None:
            return None
        run = self._client.get_run(run_id)
        searched = [p for p in parent.data.tags.get(tracking.TAG_SEARCHED, "").split(",") if p]
        metric = tracking.objective_of(parent)[0]  # (the parent read once, not again through `self.metric`)
        return BestTrial(run_id, run.data.metrics.get(metric, float("nan")),
                         {p: param_value(run.data.params.get(p)) for p in searched},
                         run.data.tags.get(tracking.TAG_KIND) == tracking.KIND_CONFIRMATION)

    @property
    def confirmation(self) -> pandas.DataFrame | None:
        """The confirmation stage's table (each configuration's seeds, mean, SD and 95 % interval over them, its gain
        over the default with the race's interval, and the round it left the race and why), best mean first; None
        for a search without one."""
        import pandas

        rows = self.confirmed()
        return pandas.DataFrame(rows) if rows else None

    def confirmed(self, trials: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """`confirmation` as dicts ([] without a confirmation stage); `trials`: `trials()`, if the caller has it."""
        return tracking.confirmation_table(self._client, self._parent, trials)

    @property
    def verdict(self) -> str:
        """Whether the confirmed winner beats the default beyond seed noise ("" without a confirmation stage)."""
        return self._parent.data.tags.get(tracking.TAG_VERDICT, "")

    def export(self, out: str | Path, register: str | None = None) -> Path:
        """Write the best run's backbone.pt, head.pt, spec.yaml, input.json and metrics.json into `out`."""
        from ssl_tune.export import export_run

        return export_run(self.tracking_uri, self.run_id, Path(out), register=register)

    def load_backbone(self) -> Pretrained:
        """`(backbone, preprocess)` of the best run, as `ssl_tune.load_backbone` loads an export."""
        from ssl_tune.export import load_backbone

        best = self.best
        if best is None:
            raise LookupError(f"search {self.name!r} has no trial with a result yet (failed trials do not count)")
        return load_backbone(best.run_id, tracking_uri=self.tracking_uri)


def load(spec_or_path: SpecBase | str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> SpecBase:
    """A spec from a file or a spec object, with `overrides` (`{"training.epochs": 3}`, or `--set` strings)."""
    from ssl_tune.spec import SpecBase
    from ssl_tune.spec.files import load_spec, spec_from_dict

    if isinstance(spec_or_path, SpecBase):
        return spec_from_dict(spec_or_path.model_dump(mode="json"), f"spec {spec_or_path.name!r}", overrides)
    return load_spec(spec_or_path, overrides)


def search(spec_or_path: SpecBase | str | Path, *, overrides: Sequence[str] | Mapping[str, Any] | None = None,
           name: str | None = None, tracking_uri: str | None = None, address: str | None = None,
           verbose: bool = False) -> Search:
    """Run a search (and its confirmation stage) to the end, as `ssl-tune run` does; returns it.

    `overrides` maps dotted field names to values, as `--set` does. The tracking store is `tracking_uri`, else
    the spec's `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db; `address` a Ray cluster
    (default a local Ray instance). Bad input raises `SpecError`; a search stopped by Ctrl-C returns with
    status KILLED (`ssl-tune resume` continues it). `Search.outcome` says how it ended.
    """
    from ssl_tune.searching.driver import run_search

    spec = load(spec_or_path, overrides or ())
    source = str(spec_or_path) if not hasattr(spec_or_path, "model_dump") else f"spec {spec.name!r} (Python)"
    outcome = run_search(spec, spec_source=source, name=name, address=address, verbose=verbose,
                         tracking_uri=tracking_uri)
    return Search(outcome.parent_run_id, outcome.tracking_uri, outcome)


def resume(name_or_run_id: str, *, tracking_uri: str | None = None, address: str | None = None,
           storage_path: str | None = None, verbose: bool = False) -> Search:
    """Continue an interrupted search, as `ssl-tune resume` does; returns it."""
    from ssl_tune.searching.driver import resume_search

    outcome = resume_search(name_or_run_id, tracking_uri=tracking_uri, address=address, verbose=verbose,
                            storage_path=storage_path)
    return Search(outcome.parent_run_id, outcome.tracking_uri, outcome)


def open_search(name_or_run_id: str, tracking_uri: str | None = None) -> Search:
    """A search already in the tracking store, by its name (`--name`), its parent run id, a trial's run id,
    or an experiment name (its latest search). Raises LookupError naming the store when there is none."""
    uri = tracking.resolve_uri(tracking_uri)
    try:
        parent = tracking.find_parent_run(tracking.existing_store_client(uri), name_or_run_id)
        tracking.objective_of(parent)  # a run that ssl-tune did not write has none: say so here, not later
    except LookupError as exc:
        raise LookupError(str(exc) if uri in str(exc) else f"{exc} (tracking store {uri})") from None
    return Search(parent.info.run_id, uri)
