"""The search's figures say what they show: the metric and its direction, which trial is which, and
how each trial ended."""

import matplotlib

from ssl_tune import figures


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
