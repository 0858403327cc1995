"""ssl-tune: hyperparameter search for self-supervised learning on Ray Tune, Optuna and MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssl-tune")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"


def load_backbone(path_or_run, *, tracking_uri=None):
    """The pretrained backbone (eval mode) from an export directory, a checkpoint or an MLflow run.

    See `ssl_tune.export.load_backbone`.
    """
    from ssl_tune.export import load_backbone as _load

    return _load(path_or_run, tracking_uri=tracking_uri)


def train(spec, out_dir, **kwargs):
    """Train one resolved spec into `out_dir` without Ray; see `ssl_tune.training.train`."""
    from ssl_tune.training import train as _train

    return _train(spec, out_dir, **kwargs)
