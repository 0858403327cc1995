"""Module paths of earlier versions, still importable. A search's saved Tune state (tuner.pkl, the searcher's
state) names the classes and functions it pickled by their module path: a search interrupted before an upgrade
of ssl-tune and resumed after it must find them where they now live. New code imports the new paths."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

# old path -> where it lives now
MOVED = {
    "ssl_tune.ranges": "ssl_tune.spec.ranges",
    "ssl_tune.search_spec": "ssl_tune.spec.search",
    "ssl_tune.specfile": "ssl_tune.spec.files",
    "ssl_tune.spec_reference": "ssl_tune.spec.reference",
    "ssl_tune.tracking.record": "ssl_tune.tracking.search_run",
    "ssl_tune.tuning": "ssl_tune.searching.driver",
    "ssl_tune.algorithms": "ssl_tune.searching.algorithms",
    "ssl_tune.budget": "ssl_tune.searching.budget",
    "ssl_tune.confirmation": "ssl_tune.searching.confirmation",
    "ssl_tune.replay": "ssl_tune.searching.replay",
    "ssl_tune.search_folder": "ssl_tune.searching.folder",
    "ssl_tune.space": "ssl_tune.searching.space",
    "ssl_tune.stopping": "ssl_tune.searching.stopping",
    "ssl_tune.warm_start": "ssl_tune.searching.warm_start",
    "ssl_tune.trial": "ssl_tune.trials.runner",
    "ssl_tune.trial_record": "ssl_tune.trials.uploads",
    "ssl_tune.checkpoints": "ssl_tune.trials.checkpoints",
    "ssl_tune.console": "ssl_tune.report.console",
    "ssl_tune.figures": "ssl_tune.report.figures",
    "ssl_tune.preview": "ssl_tune.report.preview",
    "ssl_tune.shell": "ssl_tune.report.shell",
}

# module (as it is named now) -> {old name -> "new.module.name"}: functions that moved out of a module
MOVED_ATTRIBUTES = {
    "ssl_tune.searching.driver": {"_search_dirname": "ssl_tune.searching.stage.search_dirname",
                                  "_confirmation_dirname": "ssl_tune.searching.stage.confirmation_dirname"},
}


def moved_attribute(module: str, name: str) -> Any:
    """A module's `__getattr__` for the names that moved out of it (PEP 562); else AttributeError."""
    target = MOVED_ATTRIBUTES.get(module, {}).get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, _, attribute = target.rpartition(".")
    return getattr(importlib.import_module(where), attribute)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module that now holds it (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module it stands for was executed when `create_module` imported it."""


def install() -> None:
    """Make the old paths importable in this process (once; `ssl_tune` does it on import)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # first: a stale file left at an old path never wins
