"""SSL methods over one shared training loop, and the registry that finds them.

A method is one module that defines ``METHOD``, a `trainers.base.Method` subclass with its own
``Config``; with a search-space YAML next to it (``search_spaces/NAME.yaml``) that is all a new
method needs. Methods are found without being listed anywhere:

* every module of this package other than the shared ones (``base``, ``build``, ``loop``, ``optim``), and
* every ``*.py`` file in the directories of ``$SSL_TUNE_METHOD_PATH`` (``os.pathsep``-separated):
  a researcher's own method, outside the installed package. The directories are put on
  ``sys.path`` so that Ray workers and spawned processes, which inherit the variable, import the
  same modules by the same names.

The full spec model (`spec_model`: the shared sections plus a ``method`` field over every found
method) is built here, above both the spec schema and the methods, so that imports point one way.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import sys
from pathlib import Path
from typing import Annotated, Union

from pydantic import Discriminator, Tag

from ssl_tune.spec import Choice, MethodChoice, SpecBase, SpecError
from trainers.base import Method

METHOD_PATH_ENV = "SSL_TUNE_METHOD_PATH"
SHARED_MODULES = frozenset({"base", "build", "loop", "optim"})


def method_path() -> tuple[Path, ...]:
    """The directories of `$SSL_TUNE_METHOD_PATH`, in order."""
    return tuple(Path(p).resolve() for p in os.environ.get(METHOD_PATH_ENV, "").split(os.pathsep) if p)


def _method_of(module_name: str, where: str) -> type[Method] | None:
    module = importlib.import_module(module_name)
    method = getattr(module, "METHOD", None)
    if method is None:
        return None
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise SpecError(f"{where}: METHOD must be a trainers.base.Method subclass, got {method!r}")
    return method


@functools.cache
def _discover(path: tuple[Path, ...]) -> dict[str, type[Method]]:
    found: dict[str, tuple[type[Method], str]] = {}

    def add(method: type[Method] | None, where: str) -> None:
        if method is None:
            return
        if method.name in found:
            raise SpecError(f"{where}: method name {method.name!r} is already defined by {found[method.name][1]}")
        found[method.name] = (method, where)

    for info in pkgutil.iter_modules(__path__):
        if info.name not in SHARED_MODULES and not info.name.startswith("_"):
            add(_method_of(f"{__name__}.{info.name}", f"{__name__}.{info.name}"), f"{__name__}.{info.name}")
    for directory in path:
        if not directory.is_dir():
            raise SpecError(f"${METHOD_PATH_ENV}: {directory} is not a directory")
        if str(directory) not in sys.path:
            sys.path.append(str(directory))
        for file in sorted(directory.glob("*.py")):
            add(_method_of(file.stem, str(file)), str(file))
    return {name: method for name, (method, _) in sorted(found.items())}


def methods() -> dict[str, type[Method]]:
    """Method name -> Method class, for every method module found (see the module docstring)."""
    return _discover(method_path())


def builtin_methods() -> dict[str, type[Method]]:
    """The methods that ship in this package (the README documents these)."""
    return _discover(())


@functools.cache
def _spec_model(path: tuple[Path, ...]) -> type[SpecBase]:
    from pydantic import create_model

    found = _discover(path)
    names = ", ".join(found)
    # One method's config by its name, or a choice over methods (`method.name: {type: choice, ...}`).
    method_type = Annotated[  # type: ignore[valid-type]  # built at run time from the registry
        Union[tuple(Annotated[m.Config, Tag(name)] for name, m in found.items()) + (Annotated[MethodChoice, Tag(CHOICE)],)],
        Discriminator(_method_tag, custom_error_type="unknown_method",
                      custom_error_message=f"unknown method; allowed: {names}, or a choice over them")]
    return create_model("Spec", __base__=SpecBase, method=(method_type, ...))  # type: ignore[arg-type]  # (the same)


CHOICE = "choice"


def _method_tag(value) -> str | None:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return CHOICE if isinstance(name, (dict, Choice)) else name


def spec_model() -> type[SpecBase]:
    """The full Spec class: `SpecBase` plus a `method` field over every found method's config."""
    return _spec_model(method_path())
