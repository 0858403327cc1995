"""What a search's runs hold besides metrics: checkpoints (read back) and figures (drawn and logged)."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from typing import Any

from ssl_tune.report import figures
from ssl_tune.evaluation import EVALUATION_FILE, load_arrays
from ssl_tune.searching.space import counts, param_value, study_from_trials
from ssl_tune.spec import SpecBase
from ssl_tune.storage_path import StoragePath
from ssl_tune.tracking.lookup import child_runs
from ssl_tune.tracking.store import log_metrics
from ssl_tune.tracking.tags import TAG_CHECKPOINT, TAG_CHECKPOINT_ARTIFACT


@contextlib.contextmanager
def checkpoint_on_disk(path: str):
    """A checkpoint directory as a local path: itself, or for a URI (s3://, gs://, ...) a temporary
    copy made with pyarrow's file systems (which Ray's storage uses); None if it does not exist."""
    local = StoragePath.of(path).local
    if local is not None:
        yield local if local.is_dir() else None
        return
    import tempfile

    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ssl-tune-checkpoint-") as tmp:
        pyarrow.fs.copy_files(inner, tmp, source_filesystem=filesystem)
        yield Path(tmp)


@contextlib.contextmanager
def checkpoint_of(client, run):
    """The local directory of a trial run's checkpoint (of its last evaluated epoch): Ray's copy, with the whole
    training state, when this machine sees it; else the export the trial uploaded to its run's artifacts
    (`ssl_tune.trials.uploads`; downloaded to a temporary directory), with what `load_backbone` needs."""
    import tempfile

    tagged = run.data.tags.get(TAG_CHECKPOINT)
    with checkpoint_on_disk(tagged) if tagged else contextlib.nullcontext() as local:
        if local is not None:
            yield local
            return
    artifact = run.data.tags.get(TAG_CHECKPOINT_ARTIFACT)
    if not artifact:
        raise LookupError(f"trial run {run.info.run_id} has no checkpoint on this machine ({tagged or 'none logged'}) "
                          "and no export among its MLflow artifacts (it ended before uploading one)")
    with tempfile.TemporaryDirectory(prefix="ssl-tune-checkpoint-") as tmp:
        yield Path(client.download_artifacts(run.info.run_id, artifact, tmp))


# --- figures -----------------------------------------------------------------------------------


def log_figure(client, run_id: str, fig, name: str) -> None:
    client.log_figure(run_id, fig, f"{figures.FIGURE_DIR}/{name}.png", save_kwargs=figures.SAVE_KWARGS)
    figures.close(fig)


def log_trial_figures(client, run_id: str, checkpoint_dir: str | None) -> None:
    """A trial's loss-term curves from its metric history, and the figures of the final evaluation
    arrays the trainer saved next to its final checkpoint (if that directory is on this machine)."""
    run = client.get_run(run_id)
    names = figures.loss_term_names(list(run.data.metrics))
    histories = {n: [(m.step, m.value) for m in client.get_metric_history(run_id, n)] for n in names}
    if histories:
        log_figure(client, run_id, figures.loss_terms_figure(histories), "loss_terms")
    arrays = Path(checkpoint_dir) / EVALUATION_FILE if checkpoint_dir else None
    if arrays is not None and arrays.is_file():
        for name, fig in figures.evaluation_figures(load_arrays(arrays)).items():
            log_figure(client, run_id, fig, name)


def log_search_figures(client, parent, spec: SpecBase) -> dict[str, float]:
    """Refresh a search's figures and parameter importances from its trials' runs; returns the importances.

    The Optuna plots use a study rebuilt from the runs (each trial that did not fail with the value
    of its last epoch, as the search's own study received it), so they are the same during a search,
    after it and after `ssl-tune resume`.
    """
    import optuna

    metric, mode = spec.search.metric, spec.search.mode
    runs = child_runs(client, parent)
    run_id = parent.info.run_id
    if runs:
        searched = spec.searchable_paths()
        curves = [(trial_label(run.data.params, searched),
                   [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)], run.info.status)
                  for run in runs]
        log_figure(client, run_id, figures.learning_curves_figure(curves, metric, mode, spec.training.epochs),
                   "learning_curves")
    if len(spec.method_names()) > 1:
        log_figure(client, run_id, figures.methods_figure(_method_points(runs, metric), metric, mode,
                                                          spec.training.epochs), "methods")
    finished = [(run.data.params, run.data.metrics[metric]) for run in runs
                if counts(run.data.metrics.get(metric)) and run.info.status != "FAILED"]
    if not finished:
        return {}
    study = study_from_trials(spec, finished, mode)
    varied = [p for p in spec.search_ranges() if len({t.params.get(p) for t in study.trials}) > 1]
    importances: dict[str, float] = {}
    if len(study.trials) >= 2 and varied:
        importances = optuna.importance.get_param_importances(study, params=varied)
    for name, fig in figures.study_figures(study, varied, metric, mode).items():
        log_figure(client, run_id, fig, name)
    if importances:
        log_metrics(client, run_id, {f"importance.{p}": v for p, v in importances.items()}, step=len(study.trials))
    return importances


def trial_label(params: dict[str, str], searched: list[str]) -> str:
    """A trial as a person tells it apart: its searched values, by the last part of each field's name."""
    def short(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{p.rpartition('.')[2]}={short(param_value(params.get(p)))}" for p in searched if p in params)


def _method_points(runs: list, metric: str) -> dict[str, list[tuple[int, float, int]]]:
    """Method -> (order started, objective, epochs reached) of every trial that did not fail."""
    points: dict[str, list[tuple[int, float, int]]] = collections.defaultdict(list)
    for order, run in enumerate(sorted(runs, key=lambda r: r.info.start_time)):
        value = run.data.metrics.get(metric)
        if counts(value) and run.info.status != "FAILED":
            points[run.data.params.get("method.name", "?")].append((order, value, int(run.data.metrics.get("epoch", 0))))
    return dict(sorted(points.items()))
