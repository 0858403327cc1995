"""A search's parent run: opened, closed at the end of each stage, with its best trial and confirmation."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from ssl_tune.searching import confirmation as confirmation_stage
from ssl_tune.report import figures
from ssl_tune.searching.space import best_trial, counts
from ssl_tune.spec import SpecBase
from ssl_tune.tracking.artifacts import log_figure, log_search_figures
from ssl_tune.tracking.lookup import (best_per_method, child_runs, confirmation_columns, confirmation_table,
                                      format_table, leaderboard)
from ssl_tune.tracking.race_record import race_of
from ssl_tune.tracking.store import log_metrics, log_params
from ssl_tune.tracking.tags import (KIND_CONFIRMATION, TAG_BEATS_DEFAULT, TAG_BEST_TRIAL_RUN, TAG_INTERRUPTED_AT,
                                    TAG_KIND, TAG_METHOD, TAG_METRIC, TAG_MODE, TAG_RANK_TRANSFER, TAG_REUSED_FROM,
                                    TAG_SEARCHED,
                                    TAG_STAGE, TAG_STORAGE, TAG_VERDICT, TAG_WARM_START)


def open_search_run(client, experiment: str, run_name: str, spec: SpecBase, *, spec_source: str, ray_address: str,
                    experiment_dir: str, max_concurrent: int, data: Any = None) -> str:
    """Create a search's parent run: tags (what `resume`, `results` and `export` read back), the spec as
    `spec.yaml`, the search's settings and the data cache as params. Returns its run id."""
    import yaml

    from ssl_tune import __version__

    parent = client.create_run(experiment, run_name=run_name, tags={
        TAG_KIND: "search",
        "ssl_tune.spec_hash": spec.digest(),
        "ssl_tune.spec_source": spec_source,
        "ssl_tune.git_commit": _git_commit(),
        "ssl_tune.ray_address": ray_address,
        "ssl_tune.version": __version__,
        TAG_STORAGE: experiment_dir,
        TAG_METRIC: spec.search.metric,
        TAG_MODE: spec.search.mode,
        TAG_SEARCHED: ",".join(spec.searchable_paths()),
        TAG_METHOD: ",".join(spec.method_names()),
    })
    parent_id = parent.info.run_id
    client.log_text(parent_id, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    log_params(client, parent_id, {"num_samples": spec.search.num_samples, "max_concurrent": max_concurrent,
                                   "scheduler": spec.search.scheduler, "metric": spec.search.metric})
    if data is not None:  # the driver's node's cache; every node builds or reuses its own
        log_params(client, parent_id, {"data.cache": data.path,
                                       "data.train_images": data.manifest["splits"]["train"]["shape"][0]})
        log_metrics(client, parent_id, {"data_skipped_corrupt": data.skipped}, step=0)
    return parent_id


def record_warm_start(client, parent_id: str, warm) -> None:
    """What `search.warm_start` gave this search (`ssl_tune.searching.warm_start.WarmStart`): a line per earlier search
    as a tag, and how many observations and configurations as params."""
    client.set_tag(parent_id, TAG_WARM_START, "\n".join(warm.lines)[:5000])
    log_params(client, parent_id, {"warm_start.observations": len(warm.observations),
                                   "warm_start.configurations": len(warm.points)})


def reopen_search_run(client, parent) -> None:
    """Mark an interrupted search's parent run as running again, counting the resumes."""
    client.update_run(parent.info.run_id, status="RUNNING")
    client.set_tag(parent.info.run_id, "ssl_tune.resumed", str(int(parent.data.tags.get("ssl_tune.resumed", "0")) + 1))


def close_search_run(client, parent_id: str, *, interrupted: bool, spec: SpecBase | None = None,
                     trials_ok: int = 0, confirming: bool = False) -> tuple[list[dict[str, Any]], str | None]:
    """End a search's MLflow record; returns the leaderboard and the best trial's run id.

    Interrupted: every unfinished child run and the parent end KILLED, ready for `ssl-tune resume`.
    Finished: the best trial (`space.best_trial`) is recorded on the parent (tag, `best.*` params and
    `best_*` metrics) with the leaderboard and the search's figures, and the parent ends FINISHED, or
    FAILED when no trial came through; with `confirming` it stays RUNNING for the confirmation stage
    (`record_confirmation` ends it).
    """
    parent = client.get_run(parent_id)
    # Runs still RUNNING belong to trials stopped by Ctrl-C/SIGTERM, or to a driver that died before.
    close_unfinished(client, parent)
    if interrupted:
        client.set_terminated(parent_id, "KILLED")
        return (leaderboard(client, parent) if spec is not None else []), None
    if spec is None:
        raise ValueError("close_search_run: a finished stage is recorded with its spec")
    rows = leaderboard(client, parent)
    best = best_trial(rows, spec.search.mode)
    if best is not None and not confirming:  # else the confirmed winner is recorded (MLflow params are written once)
        _record_best(client, parent_id, best["run_id"], spec)
    client.log_text(parent_id, format_table(rows), "trials.txt")
    if len(spec.method_names()) > 1:
        per_method = best_per_method(rows, spec.search.mode)
        client.log_text(parent_id, format_table(per_method), "best_per_method.txt")
        log_metrics(client, parent_id, {f"best_{spec.search.metric}.{r['method.name']}": r["objective"]
                                        for r in per_method}, step=0)
    try:
        log_search_figures(client, client.get_run(parent_id), spec)
    except Exception as exc:  # figures are a view of the results: never lose the finished search over one
        print(f"warning: the search's figures were not logged ({type(exc).__name__}: {exc})", file=sys.__stderr__)
    if confirming:
        client.set_tag(parent_id, TAG_STAGE, KIND_CONFIRMATION)
    else:
        # A search in which no trial came through did not find anything: FAILED, and a non-zero exit.
        client.set_terminated(parent_id, "FINISHED" if trials_ok else "FAILED")
    return rows, best["run_id"] if best else None


def _record_best(client, parent_id: str, run_id: str, spec: SpecBase) -> None:
    """The run export takes, on the parent: its id, its searched values (`best.*`), its metrics (`best_*`)."""
    run = client.get_run(run_id)
    client.set_tag(parent_id, TAG_BEST_TRIAL_RUN, run_id)
    log_params(client, parent_id, {f"best.{p}": run.data.params.get(p) for p in spec.searchable_paths()})
    log_metrics(client, parent_id, {f"best_{k}": v for k, v in run.data.metrics.items()}, step=0)


def _record_rank_transfer(client, parent_id: str, rows: list[dict[str, Any]], spec: SpecBase) -> None:
    """`confirm_rank_spearman` (`confirmation.rank_transfer`), its line as a tag, and its figure."""
    found = confirmation_stage.rank_transfer(rows)
    if found is None:
        return
    log_metrics(client, parent_id, {"confirm_rank_spearman": found[0]}, step=0)
    client.set_tag(parent_id, TAG_RANK_TRANSFER, confirmation_stage.rank_transfer_line(found))
    try:
        log_figure(client, parent_id, figures.rank_transfer_figure(rows, spec.search.metric, spec.search.mode, found[0]),
                   "rank_transfer")
    except Exception as exc:  # a figure is a view of the results: never lose the finished stage over one
        print(f"warning: the rank-transfer figure was not logged ({type(exc).__name__}: {exc})", file=sys.__stderr__)


def record_confirmation(client, parent_id: str, spec: SpecBase) -> tuple[list[dict[str, Any]], str, str | None]:
    """End the confirmation stage's record: the table (`confirmation.txt`), the winner's interval and
    its gain over the default as `confirmed_*`, `default_*` and `gain_*` metrics, the race's verdict as tags,
    the runs it trained and reused and its rounds as `confirm.*` params; the winner's best seed is the run
    export takes (the parent's best-run tag, `best.*` params and `best_*` metrics). The parent ends FINISHED;
    when no confirmation run finished, the search's best single run is recorded instead. Returns the table,
    the verdict and the exported run's id."""
    parent = client.get_run(parent_id)
    close_unfinished(client, parent)
    confirmations = child_runs(client, parent, KIND_CONFIRMATION)
    race = race_of(client, parent, confirmations, spec.search.metric, spec.search.mode)
    rows = confirmation_table(client, parent)
    verdict = race.verdict()
    winner = confirmation_stage.winner(rows)
    transfer = confirmation_stage.rank_transfer_line(confirmation_stage.rank_transfer(rows))
    client.log_text(parent_id, format_table(rows, confirmation_columns(rows)) + f"\n\n{verdict}\n{transfer}\n",
                    "confirmation.txt")
    reused = sum(TAG_REUSED_FROM in run.data.tags for run in confirmations)
    log_params(client, parent_id, {"confirm.runs_trained": len(confirmations) - reused, "confirm.runs_reused": reused,
                                   "confirm.rounds": race.rounds})
    if rows:
        try:
            log_figure(client, parent_id, figures.confirmation_figure(rows, spec.search.metric, spec.search.mode, verdict),
                       "confirmation")
        except Exception as exc:  # a figure is a view of the results: never lose the finished stage over one
            print(f"warning: the confirmation figure was not logged ({type(exc).__name__}: {exc})", file=sys.__stderr__)
    client.set_tag(parent_id, TAG_VERDICT, verdict[:5000])
    _record_rank_transfer(client, parent_id, rows, spec)
    if winner is None:  # no confirmation came through: the search's best single run is all there is
        best = best_trial(leaderboard(client, parent), spec.search.mode)
        if best is not None:
            _record_best(client, parent_id, best["run_id"], spec)
        client.set_terminated(parent_id, "FINISHED")
        return rows, verdict, None
    _record_winner(client, parent_id, rows, winner)
    _record_best(client, parent_id, winner["run_id"], spec)
    client.set_tag(parent_id, TAG_STAGE, "done")
    client.set_terminated(parent_id, "FINISHED")
    return rows, verdict, winner["run_id"]


def _record_winner(client, parent_id: str, rows: list[dict[str, Any]], winner: dict[str, Any]) -> None:
    """The winner's and the default's intervals, and the winner's gain, as metrics on the parent."""
    default = next((r for r in rows if r["confirms"] == confirmation_stage.DEFAULT), None)
    metrics = {"confirmed_mean": winner["mean"], "confirmed_sd": winner["sd"],
               "confirmed_ci95_low": winner["ci95_low"], "confirmed_ci95_high": winner["ci95_high"],
               "confirmed_seeds": winner["seeds"]}
    if default is not None:
        metrics.update({"default_mean": default["mean"], "default_ci95_low": default["ci95_low"],
                        "default_ci95_high": default["ci95_high"]})
    if "gain_over_default" in winner:
        metrics.update({k: winner[k] for k in ("gain_over_default", "gain_low", "gain_high")})
        client.set_tag(parent_id, TAG_BEATS_DEFAULT, str(bool(winner["beats_default"])).lower())
    log_metrics(client, parent_id, {k: v for k, v in metrics.items() if counts(v)}, step=0)


def close_unfinished(client, parent) -> None:
    for child in child_runs(client, parent, kind=None):
        if child.info.status == "RUNNING":
            client.set_tag(child.info.run_id, TAG_INTERRUPTED_AT, str(int(child.data.metrics.get("epoch", 0))))
            client.set_terminated(child.info.run_id, "KILLED")



def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""
