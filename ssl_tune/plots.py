"""Figures for MLflow: a trial's final embedding and kNN confusion matrix, its loss terms, and the
search-level pictures of a whole search (Optuna's own plots over the finished trials, parameter
importance, every trial's learning curve).

Search-level plots rebuild an in-memory Optuna study from the MLflow runs, so they work the same
during a search, after it, and after `ssl-tune resume`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ssl_tune import tracking  # noqa: E402
from ssl_tune.spec import Choice, IntRange, LogUniform, SpecBase, Uniform  # noqa: E402
from trainers.loop import FIGURE_DIR  # noqa: E402  (the same folder name next to checkpoints and in MLflow)


def log_figure(client, run_id: str, fig, name: str) -> None:
    client.log_figure(run_id, fig, f"{FIGURE_DIR}/{name}.png")
    plt.close(fig)


def save_figure(fig, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- one trial ---------------------------------------------------------------------------------


def embedding_figure(features: torch.Tensor, labels: torch.Tensor, title: str = "test embedding (PCA)"):
    """The first two principal components of the L2-normalised features, coloured by label."""
    x = torch.nn.functional.normalize(features.float().cpu(), dim=1)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    xy = (x @ v[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=4, alpha=0.7)
    ax.legend(*points.legend_elements(), title="label", fontsize=7, loc="best", markerscale=0.8)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return fig


def confusion_figure(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int, title: str = "kNN confusion (test)"):
    counts = torch.zeros(num_classes, num_classes, dtype=torch.long)
    counts.index_put_((labels.cpu(), predicted.cpu()), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    rates = counts.float() / counts.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(num_classes), yticks=range(num_classes))
    return fig


def loss_terms_figure(histories: dict[str, list[tuple[int, float]]], title: str = "loss and its terms"):
    """One panel per term (they live on different scales), epochs on the x axis."""
    names = sorted(histories, key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps, values = zip(*histories[name]) if histories[name] else ((), ())
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set(title=name, xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


TRAINING_METRICS = ("epoch", "lr", "images_per_s", "worker_nodes")


def loss_term_names(metric_names: list[str]) -> list[str]:
    """The loss and its terms among a trial's per-epoch metrics (not evaluation or bookkeeping)."""
    return [n for n in metric_names if n not in TRAINING_METRICS and not n.startswith(("knn_", "linear_"))]


def log_trial_figures(client, run_id: str, figure_dir: str | None) -> None:
    """Loss-term curves from the run's history, plus the embedding and confusion PNGs the trainer
    wrote next to the trial's final checkpoint (if that directory is local)."""
    import os

    run = client.get_run(run_id)
    names = loss_term_names(list(run.data.metrics))
    histories = {n: [(m.step, m.value) for m in client.get_metric_history(run_id, n)] for n in names}
    if histories:
        log_figure(client, run_id, loss_terms_figure(histories), "loss_terms")
    if figure_dir and os.path.isdir(figure_dir):
        client.log_artifacts(run_id, figure_dir, FIGURE_DIR)


# --- the whole search --------------------------------------------------------------------------


def _distribution(r):
    import optuna.distributions as d

    if isinstance(r, Uniform):
        return d.FloatDistribution(r.low, r.high)
    if isinstance(r, LogUniform):
        return d.FloatDistribution(r.low, r.high, log=True)
    if isinstance(r, IntRange):
        return d.IntDistribution(r.low, r.high, log=r.log, step=r.step)
    if isinstance(r, Choice):
        return d.CategoricalDistribution(r.values)
    raise TypeError(r)


def study_from_runs(spec: SpecBase, runs: list, metric: str, mode: str):
    """An in-memory Optuna study with one completed trial per run that reported the objective
    (the value at its last epoch, as the search's own study received it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranges = spec.search_ranges()
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for run in runs:
        value = run.data.metrics.get(metric)
        if value is None or math.isnan(value) or run.info.status == "FAILED":
            continue
        params, distributions = {}, {}
        for path, r in ranges.items():
            text = run.data.params.get(path)
            if text is None:
                continue
            dist = _distribution(r)
            params[path] = _parse(text, dist)
            distributions[path] = dist
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    return study


def _parse(text: str, dist) -> Any:
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == text), text)
    return int(float(text)) if isinstance(dist, d.IntDistribution) else float(text)


def learning_curves_figure(client, runs: list, metric: str, epochs: int):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if not history:
            continue
        steps, values = zip(*history)
        line, = ax.plot(steps, values, marker="o", markersize=2, linewidth=1, alpha=0.8)
        if run.info.status == "KILLED" and steps[-1] < epochs:  # stopped early by ASHA (or interrupted)
            ax.plot(steps[-1], values[-1], marker="x", markersize=9, color=line.get_color())
        elif run.info.status == "FAILED":
            ax.plot(steps[-1], values[-1], marker="X", markersize=9, color="red")
    ax.set(title="every trial (x: stopped early, red X: failed)", xlabel="epoch", ylabel=metric)
    return fig


def log_search_figures(client, parent, spec: SpecBase) -> dict[str, float]:
    """Refresh the parent run's figures and parameter importances; returns the importances."""
    import optuna
    from optuna.visualization import matplotlib as ov

    metric, mode = spec.search.metric, spec.search.mode
    runs = tracking.child_runs(client, parent)
    run_id = parent.info.run_id
    if runs:
        fig = learning_curves_figure(client, runs, metric, spec.training.epochs)
        log_figure(client, run_id, fig, "learning_curves")
    study = study_from_runs(spec, runs, metric, mode)
    completed = [t for t in study.trials if t.value is not None]
    if not completed:
        return {}
    plots = {"optimization_history": ov.plot_optimization_history, "parallel_coordinates": ov.plot_parallel_coordinate,
             "slices": ov.plot_slice}
    importances: dict[str, float] = {}
    varied = [p for p in spec.search_ranges() if len({t.params.get(p) for t in completed}) > 1]
    if len(completed) >= 2 and varied:
        importances = optuna.importance.get_param_importances(study, params=varied)
        plots["param_importances"] = lambda s: ov.plot_param_importances(s, params=varied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in plots.items():
            ax = plot(study)
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            log_figure(client, run_id, figure, name)
    if importances:
        tracking.log_metrics(client, run_id, {f"importance.{p}": v for p, v in importances.items()}, step=len(completed))
    return importances
