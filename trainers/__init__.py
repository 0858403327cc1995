"""SSL methods over one shared training loop.

A method is one module in this package that defines ``METHOD``, a `trainers.base.Method`
subclass with its own ``Config``; it is found here without being listed anywhere.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from trainers.base import Method

_SHARED_MODULES = {"base", "loop", "optim"}


@functools.cache
def methods() -> dict[str, type[Method]]:
    """Method name -> Method class, for every method module in this package."""
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _SHARED_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if method is not None:
            found[method.name] = method
    return dict(sorted(found.items()))


def method_configs() -> dict[str, type]:
    return {name: m.Config for name, m in methods().items()}
