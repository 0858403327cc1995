"""Figures drawn from data: a trial's final embedding and kNN confusion matrix (from the arrays the
trainer saves next to its final checkpoint), its loss terms, and the pictures of a whole search
(every trial's learning curve, Optuna's own plots over a study of the finished trials).

Only pictures live here: where the data comes from (MLflow, a checkpoint directory) and where the
pictures go (MLflow, a folder) is the caller's business (`ssl_tune.tracking`, `ssl_tune.training`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


# The folder of figures next to a run's files and among its MLflow artifacts.
FIGURE_DIR = "figures"
# The loop's bookkeeping metrics: not the loss or its terms.
TRAINING_METRICS = ("epoch", "lr", "images_per_s", "worker_nodes")

Figure = matplotlib.figure.Figure


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- one trial ---------------------------------------------------------------------------------


def embedding_figure(xy: np.ndarray, labels: np.ndarray, title: str = "test embedding (PCA)") -> Figure:
    """Points in the plane of the first two principal components, coloured by label."""
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4, alpha=0.7)
    ax.legend(*points.legend_elements(), title="label", fontsize=7, loc="best", markerscale=0.8)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return fig


def confusion_figure(counts: np.ndarray, title: str = "kNN confusion (test)") -> Figure:
    """Rows: true class; columns: predicted class; each row as fractions of its class."""
    num_classes = counts.shape[0]
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(num_classes), yticks=range(num_classes))
    return fig


def evaluation_figures(arrays: Mapping[str, np.ndarray]) -> dict[str, Figure]:
    """The figures of a run's final evaluation arrays (`trainers.loop.EVALUATION_FILE`)."""
    return {"embedding": embedding_figure(arrays["embedding_2d"], arrays["labels"]),
            "knn_confusion": confusion_figure(arrays["confusion"])}


def loss_term_names(metric_names: Sequence[str]) -> list[str]:
    """The loss and its terms among a run's per-epoch metrics (not evaluation or bookkeeping)."""
    return [n for n in metric_names if n not in TRAINING_METRICS and not n.startswith(("knn_", "linear_"))]


def loss_terms_figure(histories: Mapping[str, Sequence[tuple[int, float]]], title: str = "loss and its terms") -> Figure:
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


# --- the whole search --------------------------------------------------------------------------


def learning_curves_figure(curves: Sequence[tuple[Sequence[tuple[int, float]], str]], metric: str, epochs: int) -> Figure:
    """Every trial's objective by epoch: `curves` holds (history, status) per trial; a KILLED trial
    that stopped before the last epoch ends in an x, a FAILED one in a red X."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for history, status in curves:
        if not history:
            continue
        steps, values = zip(*sorted(history))
        line, = ax.plot(steps, values, marker="o", markersize=2, linewidth=1, alpha=0.8)
        if status == "KILLED" and steps[-1] < epochs:  # stopped early by ASHA (or interrupted)
            ax.plot(steps[-1], values[-1], marker="x", markersize=9, color=line.get_color())
        elif status == "FAILED":
            ax.plot(steps[-1], values[-1], marker="X", markersize=9, color="red")
    ax.set(title="every trial (x: stopped early, red X: failed)", xlabel="epoch", ylabel=metric)
    return fig


def methods_figure(points: Mapping[str, Sequence[tuple[int, float, int]]], metric: str, mode: str, epochs: int) -> Figure:
    """A search across methods: each trial's objective (its last evaluated epoch) against the order it
    started in, one colour per method; filled markers for trials that reached the last epoch, hollow
    for trials stopped early; the line is each method's best so far."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, trials in points.items():
        ordered = sorted(trials)
        x = np.array([t[0] for t in ordered], dtype=float)
        y = np.array([t[1] for t in ordered], dtype=float)
        full = np.array([t[2] >= epochs for t in ordered], dtype=bool)
        (dots,) = ax.plot(x[full], y[full], "o", label=f"{method} ({len(ordered)} trials)")
        ax.plot(x[~full], y[~full], "o", mfc="none", color=dots.get_color())
        best = np.maximum.accumulate(y) if mode == "max" else np.minimum.accumulate(y)
        ax.step(x, best, where="post", color=dots.get_color(), alpha=0.6)
    ax.set_xlabel("trial (order started)")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title("objective per method\nfilled: reached the last epoch; hollow: stopped early; line: best so far",
                 fontsize=10)
    ax.legend(fontsize=8)
    return fig


def study_figures(study, varied: Sequence[str]) -> dict[str, Figure]:
    """Optuna's own plots of a study of finished trials; parameter importance over the `varied`
    parameters when there are some and at least two trials."""
    from optuna.visualization import matplotlib as ov

    plots: dict[str, Callable] = {"optimization_history": ov.plot_optimization_history,
                                  "parallel_coordinates": ov.plot_parallel_coordinate, "slices": ov.plot_slice}
    if len(study.trials) >= 2 and varied:
        plots["param_importances"] = lambda s: ov.plot_param_importances(s, params=list(varied))
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in plots.items():
            ax = plot(study)
            figures[name] = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    return figures


def close(fig: Figure) -> None:
    plt.close(fig)
