"""The package's imports point one way: no module imports, directly or through others, a module
that imports it back (function-level imports count too; they only hide a circle).

Layers, bottom up: the schema, data, models and evaluation; the methods and the shared loop
(`trainers`, whose registry builds the full spec model); loading specs, one trial, tracking and
figures; the search; the command line."""

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("ssl_tune", "trainers")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (Path(ROOT) / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (a `from a import b` names a.b when
    that is a module, else a)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            # A module's own packages are initialised before it whatever it imports: not an edge.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    from c import y\n")
    (tmp_path / "c.py").write_text("import a\n")
    graph = {name: imports_of(name, tmp_path / f"{name}.py", {"a", "b", "c"}) for name in "abc"}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_layers_point_down():
    """The schema knows no method; figures know neither the trainer nor tracking; methods know no
    search; the trainer draws nothing."""
    graph = import_graph()
    assert not {m for m in graph["ssl_tune.spec"] if m.startswith("trainers")}
    assert not graph["ssl_tune.report.figures"] & {"ssl_tune.tracking", "trainers.loop", "ssl_tune.searching.driver"}
    for method in (m for m in graph if m.startswith("trainers.") and m not in ("trainers.loop", "trainers.optim")):
        assert not {m for m in graph[method] if m in ("ssl_tune.searching.driver", "ssl_tune.tracking", "trainers.loop")}, method
    assert "ssl_tune.report.figures" not in graph["trainers.loop"]


# Declarative tables, the one exception to the function limit: the command line's argument parser.
DECLARATIVE_TABLES = {("ssl_tune.cli", "build_parser")}


def test_modules_and_functions_stay_small_enough_to_own():
    """One concern per module and per function, trainers included: no module over 400 lines, no function over 60
    (the argument parser, a declarative table, aside)."""
    files = module_files()
    sizes = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    long_functions = {(name, node.name): node.end_lineno - node.lineno + 1
                      for name, path in files.items() for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60}
    assert {key: n for key, n in long_functions.items() if key not in DECLARATIVE_TABLES} == {}
    assert set(DECLARATIVE_TABLES) <= set(long_functions)  # (an exception that is no longer needed goes)


def test_whether_a_path_is_a_uri_is_decided_in_one_place():
    """`ssl_tune.storage_path` alone tells an object-store URI from a local path (`StoragePath`, `is_uri`)."""
    asked = {name for name, path in module_files().items()
             if name != "ssl_tune.storage_path" and re.search(r"""["']://["']\s+(not\s+)?in\b""", path.read_text())}
    assert asked == set()


ENVIRONMENT_WRITE = re.compile(r"os\.environ(\[[^\]]+\]\s*=[^=]|\.(setdefault|update|pop|popitem|clear)\()"
                               r"|os\.putenv|del os\.environ")


def test_the_environment_is_written_in_one_place():
    """`ssl_tune.process_env` alone sets this process's environment (at start-up: a command's, a search's, a
    trial's); the rest read it."""
    writers = {name for name, path in module_files().items()
               if name != "ssl_tune.process_env" and ENVIRONMENT_WRITE.search(path.read_text())}
    assert writers == set()
    assert ENVIRONMENT_WRITE.search('os.environ["A"] = "1"') and ENVIRONMENT_WRITE.search("os.environ.pop('A', None)")
    assert not ENVIRONMENT_WRITE.search('os.environ["A"] == "1" or os.environ.get("A")')


def calls_between_functions(tree: ast.Module) -> dict[str, set[str]]:
    """Which of a module's functions (methods included) each calls by name, itself included."""
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {name: {call.func.id if isinstance(call.func, ast.Name) else call.func.attr for call in ast.walk(node)
                   if isinstance(call, ast.Call) and isinstance(call.func, (ast.Name, ast.Attribute))} & set(functions)
            for name, node in functions.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        for callee in sorted(graph.get(node, ())):
            found = visit(callee, path + [node])
            if found:
                return found
        return None

    return next((found for node in sorted(graph) if (found := visit(node, []))), None)


def test_a_search_runs_its_stages_in_order_without_recursion_or_module_state():
    """`ssl_tune.searching.driver` calls its stages one after the other (`_run_stages`): no function of the search's
    modules reaches itself again, and they keep no state at module level (constants only)."""
    files = module_files()
    for name in ("ssl_tune.searching.driver", "ssl_tune.searching.stage", "ssl_tune.searching.stopping"):
        tree = ast.parse(files[name].read_text())
        assert cycle_in(calls_between_functions(tree)) is None, name
        state = [target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(target, ast.Name) and not target.id.isupper()]
        assert state == [], name
    # The finder finds the circle the stages once made: fit and record, confirm, fit and record again.
    old = ast.parse("def fit_and_record():\n    record()\ndef record():\n    confirm()\ndef confirm():\n    fit_and_record()\n")
    assert cycle_in(calls_between_functions(old)) == ["confirm", "fit_and_record", "record", "confirm"]
