"""ssl-tune: hyperparameter search for self-supervised learning on Ray Tune, Optuna and MLflow."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package imports nothing heavy until a function is called
    from ssl_tune.api import Search, open_search, resume, search  # noqa: F401
    from ssl_tune.export import Pretrained
    from ssl_tune.spec import SpecBase
    from trainers.loop import TrainResult

from ssl_tune import moved_modules

moved_modules.install()  # a search saved by an earlier version names classes by their old module paths

try:
    __version__ = version("ssl-tune")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"


def load_backbone(path_or_run: str | Path, *, tracking_uri: str | None = None) -> Pretrained:
    """`(backbone, preprocess)`: the pretrained backbone (eval mode) from an export directory, a
    checkpoint, an MLflow run or a registered model, and the transform that turns a PIL image or a
    uint8 tensor into its input. See `ssl_tune.export.load_backbone`.
    """
    from ssl_tune.export import load_backbone as _load

    return _load(path_or_run, tracking_uri=tracking_uri)


def train(spec: SpecBase, out_dir: str | Path, **kwargs: Any) -> TrainResult:
    """Train one resolved spec into `out_dir` without Ray; see `ssl_tune.training.train`."""
    from ssl_tune.training import train as _train

    return _train(spec, out_dir, **kwargs)


_API = ("search", "open_search", "resume", "Search", "BestTrial")  # `ssl_tune.api`, imported on first use (Ray)


def __getattr__(name: str) -> Any:
    if name in _API:
        from ssl_tune import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssl_tune' has no attribute {name!r}")
