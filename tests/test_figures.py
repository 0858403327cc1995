"""The search's figures say what they show: the metric and its direction, which trial is which, and
how each trial ended."""

import matplotlib

from ssl_tune.report import figures


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_learning_curves_name_every_trial_best_first_and_mark_how_each_ended():
    curves = [("trial-a", [(1, 70.0), (2, 72.0)], "KILLED"),  # stopped early by ASHA
              ("trial-b", [(1, 71.0), (2, 74.0), (3, 76.0)], "FINISHED"),
              ("trial-c", [(1, 69.0)], "FAILED"),
              ("trial-d", [], "RUNNING")]  # nothing logged yet: not drawn
    fig = figures.learning_curves_figure(curves, "knn_top1", "max", 3)
    ax = fig.axes[0]
    assert ax.get_title(loc="center") == "knn_top1 (higher is better) by epoch, every trial"
    (trials,) = fig.legends
    assert legend_texts(trials) == ["trial-b: 76", "trial-a: 72", "trial-c: 69 (failed)"]  # best first
    assert legend_texts(ax.get_legend()) == ["reached epoch 3", "stopped early", "failed"]
    markers = {line.get_marker(): line for line in ax.lines if len(line.get_xdata()) == 1}
    assert set(markers) == {"o", "s", "X"}  # three distinct shapes
    assert markers["s"].get_markerfacecolor() == "white" and markers["X"].get_color() == "red"
    figures.close(fig)
    lower = figures.learning_curves_figure(curves[:2], "loss", "min", 3)
    assert lower.axes[0].get_title() == "loss (lower is better) by epoch, every trial"
    assert legend_texts(lower.legends[0]) == ["trial-a: 72", "trial-b: 76"]  # lower is better
    figures.close(lower)


def test_optunas_figures_are_titled_with_the_objective_and_keep_their_style_to_themselves():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    distribution = optuna.distributions.FloatDistribution(0.1, 1.0)
    for i in range(4):
        study.add_trial(optuna.trial.create_trial(params={"method.tau": 0.1 + 0.2 * i}, distributions={"method.tau": distribution},
                                                  value=float(i)))
    style = dict(matplotlib.rcParams)
    drawn = figures.study_figures(study, ["method.tau"], "loss", "min")
    assert drawn["optimization_history"].axes[0].get_title(loc="left") == "optimization history: loss (lower is better)"
    assert drawn["optimization_history"].axes[0].get_ylabel() == "loss"
    assert drawn["param_importances"].axes[0].get_title(loc="left") == "importance of each parameter for loss"
    assert all(ax.get_title(loc=loc) == "" for ax in drawn["param_importances"].axes[:1] for loc in ("center", "right"))
    assert dict(matplotlib.rcParams) == style  # Optuna's ggplot style did not leak into later figures
    for fig in drawn.values():
        figures.close(fig)


def test_importance_labels_are_whole_inside_the_picture():
    """Optuna's fixed margins once cut long parameter names to "ptimizer.lr"."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    names = ["optimizer.weight_decay", "method.teacher_temperature"]
    distributions = {n: optuna.distributions.FloatDistribution(0.1, 1.0) for n in names}
    for i in range(6):
        params = {names[0]: 0.1 + 0.15 * i, names[1]: 0.9 - 0.1 * (i % 3)}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(i)))
    fig = figures.study_figures(study, names, "knn_top1", "max")["param_importances"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(names)
    assert all(t.get_window_extent(renderer).x0 >= 0 for t in labels)  # not cut at the picture's left edge
    figures.close(fig)


def test_the_confirmation_figure_shows_each_mean_and_interval_against_the_default():
    rows = [{"configuration": "search #1", "seeds": 3, "mean": 80.65, "ci95_low": 79.41, "ci95_high": 81.89,
             "gain_over_default": 1.53},
            {"configuration": "search #2", "seeds": 3, "mean": 79.7, "ci95_low": 78.71, "ci95_high": 80.69,
             "gain_over_default": 0.58},
            {"configuration": "default", "seeds": 3, "mean": 79.12, "ci95_low": 77.78, "ci95_high": 80.46}]
    fig = figures.confirmation_figure(rows, "knn_top1", "max")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["default", "search #2", "search #1"]  # best at the top
    bars = [c for c in ax.containers if hasattr(c, "has_xerr") and c.has_xerr]
    assert len(bars) == 3
    # each bar spans its interval
    spans = sorted((seg[0][0], seg[1][0]) for c in bars for seg in c.lines[2][0].get_segments())
    assert spans == [(77.78, 80.46), (78.71, 80.69), (79.41, 81.89)]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--"] == [79.12]  # the default's mean
    assert "gain +1.53" in [t.get_text().strip().split(", ")[-1] for t in ax.texts]
    figures.close(fig)


def test_class_names_label_the_confusion_matrix_and_the_embedding():
    import numpy as np

    names = ["T-shirt/top", "Trouser", "Pullover"]
    arrays = {"embedding_2d": np.random.default_rng(0).normal(size=(30, 2)), "labels": np.arange(30) % 3,
              "confusion": np.eye(3, dtype=int) * 10, "class_names": np.asarray(names)}
    drawn = figures.evaluation_figures(arrays)
    confusion = drawn["knn_confusion"].axes[0]
    assert [t.get_text() for t in confusion.get_xticklabels()] == names
    assert [t.get_text() for t in confusion.get_yticklabels()] == names
    assert legend_texts(drawn["embedding"].legends[0]) == names
    for fig in drawn.values():
        figures.close(fig)
    unnamed = figures.evaluation_figures({k: v for k, v in arrays.items() if k != "class_names"})
    assert [t.get_text() for t in unnamed["knn_confusion"].axes[0].get_xticklabels()] == ["0", "1", "2"]
    for fig in unnamed.values():
        figures.close(fig)
    many = 200  # past NAMED_CLASSES: no name per class on the axes, and a legend of a few entries, not 200
    crowded = figures.evaluation_figures({"embedding_2d": np.random.default_rng(0).normal(size=(400, 2)),
                                          "labels": np.arange(400) % many, "confusion": np.eye(many, dtype=int),
                                          "class_names": np.asarray([f"class {i}" for i in range(many)])})
    assert len(legend_texts(crowded["embedding"].legends[0])) < 20
    assert "class 0" not in [t.get_text() for t in crowded["knn_confusion"].axes[0].get_xticklabels()]
    for fig in crowded.values():
        figures.close(fig)


def test_learning_curves_name_trials_by_their_searched_values():
    from ssl_tune.tracking.artifacts import trial_label

    params = {"optimizer.lr": "1.0349", "method.tau": "0.7763", "method.name": "twist", "training.epochs": "8"}
    assert trial_label(params, ["optimizer.lr", "method.tau", "method.name"]) == "lr=1.03 tau=0.776 name=twist"
