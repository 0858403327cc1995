"""ssl-tune: hyperparameter search for self-supervised learning on Ray Tune, Optuna and MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ssl-tune")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
