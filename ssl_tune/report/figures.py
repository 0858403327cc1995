"""Figures drawn from data: a trial's final embedding and kNN confusion matrix (from the arrays the
trainer saves next to its final checkpoint), its loss terms, and the pictures of a whole search
(every trial's learning curve, Optuna's own plots over a study of the finished trials).

Only pictures live here: where the data comes from (MLflow, a checkpoint directory) and where the
pictures go (MLflow, a folder) is the caller's business (`ssl_tune.tracking`, `ssl_tune.training`).
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ssl_tune.searching.space import direction  # noqa: E402

# The folder of figures next to a run's files and among its MLflow artifacts.
FIGURE_DIR = "figures"
# The loop's bookkeeping metrics and telemetry: not the loss or its terms.
TRAINING_METRICS = ("epoch", "lr", "images_per_s", "images_per_s_with_eval", "peak_device_memory_gib", "worker_nodes")

Figure = matplotlib.figure.Figure


# How every figure is written, to a folder or to MLflow: the whole picture, labels and legends included.
SAVE_KWARGS: dict[str, Any] = {"dpi": 110, "bbox_inches": "tight"}


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, **SAVE_KWARGS)
    plt.close(fig)


# --- one trial ---------------------------------------------------------------------------------


# Up to this many classes are named on a figure's axes and legend; beyond, they would not be legible.
NAMED_CLASSES = 20


def embedding_figure(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
                     title: str = "test embedding (PCA)") -> Figure:
    """Points in the plane of the first two principal components, coloured by class (named where known)."""
    fig, ax = plt.subplots(figsize=(6.8, 5), layout="constrained")
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max(initial=0) < 10 else "tab20",
                        s=4, alpha=0.7)
    named = class_names is not None and len(class_names) <= NAMED_CLASSES
    # One entry per class when they are named; else matplotlib's few evenly spaced labels (1,000 classes).
    handles, numbers = points.legend_elements(num=None if named else "auto")  # type: ignore[arg-type]  # None: every class
    if named and class_names is not None:
        numbers = [class_names[int(c)] for c in sorted(set(labels.tolist()))][: len(handles)]
    fig.legend(handles, numbers, title="class", fontsize=7, loc="outside right upper", markerscale=0.8)
    ax.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return fig


def confusion_figure(counts: np.ndarray, class_names: Sequence[str] | None = None,
                     title: str = "kNN confusion (test)") -> Figure:
    """Rows: true class; columns: predicted class; each row as fractions of its class; classes named where known."""
    num_classes = counts.shape[0]
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5.5), layout="constrained")
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set(title=title, xlabel="predicted", ylabel="true")
    if num_classes <= NAMED_CLASSES:
        names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        ax.set_xticks(range(num_classes), names, rotation=45 if class_names is not None else 0, ha="right"
                      if class_names is not None else "center", fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
    return fig


def evaluation_figures(arrays: Mapping[str, np.ndarray]) -> dict[str, Figure]:
    """The figures of a run's final evaluation arrays (`trainers.loop.EVALUATION_FILE`)."""
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return {"embedding": embedding_figure(arrays["embedding_2d"], arrays["labels"], names),
            "knn_confusion": confusion_figure(arrays["confusion"], names)}


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


# How each way a trial can end looks at the end of its curve.
END_MARKERS: dict[str, dict[str, Any]] = {
    "finished": dict(marker="o", markersize=7),  # reached the last epoch (filled)
    "stopped": dict(marker="s", markersize=7, markerfacecolor="white", markeredgewidth=1.5),  # hollow square
    "failed": dict(marker="X", markersize=10, color="red")}


def learning_curves_figure(curves: Sequence[tuple[str, Sequence[tuple[int, float]], str]], metric: str, mode: str,
                           epochs: int) -> Figure:
    """Every trial's objective by epoch. `curves` holds (label, history, MLflow status) per trial.

    The legend names each trial (by its searched values, as the caller labels it) with its last value, best first; the end of each
    curve says how the trial ended: a filled circle when it reached the last epoch, a hollow square
    when it was stopped early (by ASHA, or interrupted), a red X when it failed.
    """
    # Constrained layout keeps the trials' legend, outside the axes, inside the picture however it is saved.
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    colours = matplotlib.colormaps["tab20"].colors  # type: ignore[attr-defined]  # a ListedColormap
    sign = -1 if mode == "max" else 1
    drawn = sorted(((label, sorted(history), status) for label, history, status in curves if history),
                   key=lambda c: (c[2] == "FAILED", sign * c[1][-1][1]))
    ends = set()
    for i, (label, history, status) in enumerate(drawn):
        steps, values = zip(*history)
        colour = colours[i % len(colours)]
        ax.plot(steps, values, marker="o", markersize=2, linewidth=1.6 if i == 0 else 1, color=colour, alpha=0.9,
                label=f"{label}: {values[-1]:.4g}" + (" (failed)" if status == "FAILED" else ""))
        end = ("failed" if status == "FAILED" else "finished" if steps[-1] >= epochs
               else "stopped" if status in ("KILLED", "FINISHED") else None)  # None: still running
        if end is not None:
            ends.add(end)
            ax.plot(steps[-1], values[-1], linestyle="none", **{"color": colour, **END_MARKERS[end]})
    if drawn:
        fig.legend(title=f"trial's values: last {metric}", fontsize=7, title_fontsize=8, loc="outside right upper",
                   ncol=2 if len(drawn) > 16 else 1)
    if ends:  # the end markers' key, inside the axes
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], linestyle="none", **{"color": "grey", **END_MARKERS[e]}) for e in END_MARKERS if e in ends]
        labels = {"finished": f"reached epoch {epochs}", "stopped": "stopped early", "failed": "failed"}
        ax.legend(handles, [labels[e] for e in END_MARKERS if e in ends], fontsize=7, loc="lower right")
    ax.set(title=f"{direction(metric, mode)} by epoch, every trial", xlabel="epoch", ylabel=metric)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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
    ax.set_ylabel(direction(metric, mode))
    ax.set_title(f"{metric}, each trial by method\nfilled: reached the last epoch; hollow: stopped early; line: best so far",
                 fontsize=10)
    ax.legend(fontsize=8)
    return fig


def confirmation_figure(rows: Sequence[Mapping], metric: str, mode: str, verdict: str = "") -> Figure:
    """The confirmation stage: each configuration's mean over its seeds with its 95 % interval, best first from
    the top, against the default's (a dashed line and a band); each with its seeds and gain, and the round it
    left the race and why; the race's verdict under the plot. `rows`: `tracking.confirmation_table`."""
    import math

    drawn = [r for r in rows if isinstance(r.get("mean"), float) and not math.isnan(r["mean"])]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.55 * max(len(drawn), 1)), layout="constrained")
    default = next((r for r in drawn if r["configuration"] == "default"), None)
    if default is not None and not math.isnan(default["ci95_low"]):
        ax.axvspan(default["ci95_low"], default["ci95_high"], color="grey", alpha=0.15, label="default's 95 % interval")
    if default is not None:
        ax.axvline(default["mean"], color="grey", linestyle="--", linewidth=1, label="default's mean")
    for y, row in enumerate(reversed(drawn)):
        low, high = row["ci95_low"], row["ci95_high"]
        error = [[row["mean"] - low], [high - row["mean"]]] if not math.isnan(low) else None
        colour = "grey" if row is default else "tab:blue"
        ax.errorbar(row["mean"], y, xerr=error, fmt="o", color=colour, capsize=4)
        gain = row.get("gain_over_default")
        note = f"  {row['seeds']} seeds" + (f", gain {gain:+.3g}" if isinstance(gain, float) and not math.isnan(gain) else "")
        note += f"; left {row['left_race']}" if row.get("left_race") else ""
        ax.annotate(note, (row["mean"], y), textcoords="offset points", xytext=(0, 7), fontsize=7, ha="center")
    ax.set_yticks(range(len(drawn)), [r["configuration"] for r in reversed(drawn)])
    ax.set_ylim(-0.6, len(drawn) - 0.4)
    ax.set(title=f"confirmed on fresh seeds: mean and 95 % interval ({direction(metric, mode)})")
    ax.set_xlabel(metric + ("\n" + textwrap.fill(verdict, 100) if verdict else ""), fontsize=8)
    if default is not None:
        ax.legend(fontsize=7, loc="lower right")
    return fig


def rank_transfer_figure(rows: Sequence[Mapping], metric: str, mode: str, rho: float) -> Figure:
    """Each confirmed configuration's search score (its single run in the search, x) against its confirmed
    mean with the 95 % interval (y); Spearman's rho in the title (`confirmation.rank_transfer`)."""
    import math

    drawn = [r for r in rows if all(isinstance(r.get(k), float) and not math.isnan(r[k])
                                    for k in ("search_objective", "mean"))]
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for row in drawn:
        low, high = row["ci95_low"], row["ci95_high"]
        error = [[row["mean"] - low], [high - row["mean"]]] if not math.isnan(low) else None
        colour = "grey" if row["configuration"] == "default" else "tab:blue"
        ax.errorbar(row["search_objective"], row["mean"], yerr=error, fmt="o", color=colour, capsize=4)
        ax.annotate(row["configuration"], (row["search_objective"], row["mean"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=7)
    ax.set(xlabel=f"{metric} in the search (one run)", ylabel=f"{metric} confirmed (mean, 95 % interval)",
           title=f"rank transfer: Spearman {rho:+.2f} over {len(drawn)} configurations ({direction(metric, mode)})")
    ax.title.set_fontsize(9)
    return fig


def study_figures(study, varied: Sequence[str], metric: str, mode: str) -> dict[str, Figure]:
    """Optuna's own plots of a study of finished trials, titled with the objective and its direction;
    parameter importance over the `varied` parameters when there are some and at least two trials."""
    from optuna.visualization import matplotlib as ov

    plots: dict[str, Callable] = {"optimization_history": ov.plot_optimization_history,
                                  "parallel_coordinates": ov.plot_parallel_coordinate, "slices": ov.plot_slice}
    if len(study.trials) >= 2 and varied:
        plots["param_importances"] = lambda s: ov.plot_param_importances(s, params=list(varied))
    objective = direction(metric, mode)
    figures = {}
    # Optuna's plots switch matplotlib to its ggplot style globally: keep that to these figures.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in plots.items():
            drawn = plot(study)
            axes = list(drawn.flat) if hasattr(drawn, "flat") else [drawn]
            fig = axes[0].figure
            if name in ("optimization_history", "slices"):  # Optuna says "Objective Value"
                for ax in axes:
                    if ax.get_ylabel():
                        ax.set_ylabel(metric)
            title = {"optimization_history": "optimization history", "parallel_coordinates": "parallel coordinates",
                     "slices": "objective against each parameter",
                     "param_importances": f"importance of each parameter for {metric}"}[name]
            title = title if name == "param_importances" else f"{title}: {objective}"
            if len(axes) == 1:
                for loc in ("left", "center", "right"):  # Optuna's own title, wherever it put it
                    axes[0].set_title("", loc=loc)
                axes[0].set_title(title, loc="left")
                fig.tight_layout()  # Optuna's fixed margins cut long parameter names ("ptimizer.lr")
            else:
                fig.suptitle(title)
            figures[name] = fig
    return figures


def close(fig: Figure) -> None:
    plt.close(fig)
