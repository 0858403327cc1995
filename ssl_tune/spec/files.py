"""Reading specs: YAML (and ``--set a.b=value`` overrides) -> a validated spec of `trainers.spec_model`.

``load_spec`` raises `SpecError` whose message names the file, the field path and what is allowed.
This sits above the method registry (`trainers`), which sits above the schema (`ssl_tune.spec`):
the schema knows no method, the methods know the schema, and only loading needs both.
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ssl_tune.spec import Choice, SpecBase, SpecError, range_default, set_path
from trainers import methods, spec_model

# A YAML document may name a node once (&anchor) and reuse it (*alias) without copying it; expanded,
# nine levels of nine aliases are 387 million nodes (the "billion laughs"). Specs are a few hundred.
MAX_YAML_NODES = 100_000
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


def short_repr(value: Any) -> str:
    """`repr` of a value from a spec, cut to about 100 characters whatever its size (for error messages)."""
    return _short.repr(value)


def _expanded_nodes(node: yaml.Node, limit: int) -> int:
    """How many nodes `node` has with every alias expanded, counting up to just past `limit`."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise SpecError("an alias refers to a node that contains it (a recursive structure)")
        open_nodes.add(id(n))
        total = 1
        children = n.value if isinstance(n, yaml.SequenceNode) else \
            [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else []
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def safe_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` with aliases bounded (`MAX_YAML_NODES` once expanded); SpecError names `source`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            nodes = _expanded_nodes(node, MAX_YAML_NODES)
        except SpecError as exc:
            raise SpecError(f"invalid spec {source}: {exc}") from None
        except RecursionError:
            raise SpecError(f"invalid spec {source}: nested too deeply") from None
        if nodes > MAX_YAML_NODES:
            raise SpecError(f"invalid spec {source}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; "
                            "a spec needs a few hundred, so write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def apply_override(raw: dict, override: str) -> None:
    """Apply one `a.b=value` override; the value is parsed as YAML (`3`, `0.1`, `[1, 2]`, `{...}`)."""
    path, sep, text = override.partition("=")
    if not sep or not path.strip() or any(not k for k in path.strip().split(".")):
        raise SpecError(f"override {override!r} must look like section.field=value")
    try:
        value = safe_yaml(text, f"override {short_repr(override)}")
    except yaml.YAMLError as exc:
        raise SpecError(f"override {short_repr(override)}: value is not valid YAML ({exc})") from exc
    set_path(raw, path.strip().split("."), value)


def _allowed_fields(raw: dict, loc: list[str]) -> list[str]:
    """Field names allowed in the section at `loc[:-1]` (for unknown-field errors)."""
    current: Any = spec_model()
    for depth, key in enumerate(loc[:-1]):
        field = current.model_fields.get(key) if current is not None else None
        if field is None:
            return []
        if depth == 0 and key == "method":
            name = raw.get("method", {}).get("name") if isinstance(raw.get("method"), dict) else None
            current = (methods()[name].Config if name in methods() else None)
            continue
        annotation = field.annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(current.model_fields) if current is not None else []


def _user_loc(loc: tuple) -> list[str]:
    """Pydantic's error location without union branch names: the field path a user wrote."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _BRANCH_TAGS))]
    if len(parts) > 1 and parts[0] == "method" and parts[1] in methods():
        del parts[1]
    return parts


def _format_errors(exc: ValidationError, raw: dict, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for err in exc.errors(include_url=False):
        loc = _user_loc(err["loc"])
        path = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(raw, loc)
            msg = "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "union_tag_not_found":
            msg = "a search range needs `type`: one of uniform, loguniform, int, choice"
        elif err["type"] == "missing":
            msg = "required field is missing"
        value = err.get("input")
        shown = err["type"] not in ("missing", "extra_forbidden") and not isinstance(value, dict)
        got = f" (got {short_repr(value)})" if shown else ""
        # errors of the whole spec (cross-field checks) have no path and name their fields themselves
        lines.append(f"  {path}: {msg}{got}" if loc else f"  {msg}")
    return "\n".join(dict.fromkeys(lines))  # unions repeat the same line per branch


_BRANCH_TAGS = {"fixed", "range", "uniform", "loguniform", "int", "choice"}


def _validate(raw: Any, source: str) -> SpecBase:
    model = spec_model()
    if not isinstance(raw, dict):
        raise SpecError(f"invalid spec {source}: the file must hold a mapping of sections, got {type(raw).__name__}")
    try:
        spec = model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, raw, source)) from None
    _check_range_bounds(spec, source)
    return spec


def _check_method_branches(spec: SpecBase, source: str) -> None:
    """A choice over methods: every value must be a method, and each branch may only set that method's fields."""
    choice = spec.search_ranges().get("method.name")
    if not isinstance(choice, Choice):  # (a range over method names is always a choice)
        return
    found, problems = methods(), []
    for value in choice.values:
        if str(value) not in found:
            problems.append(f"  method.name: {short_repr(value)} is not a method; allowed: {', '.join(found)}")
    for value, branch in choice.branches.items():
        config = found.get(value)
        for sub_path in branch:
            field = sub_path.removeprefix("method.")
            if config is not None and (not sub_path.startswith("method.") or field not in config.Config.model_fields
                                       or field == "name"):
                problems.append(f"  method.name.branches.{value}.{sub_path}: not a field of {value}; allowed: "
                                + ", ".join(f"method.{f}" for f in config.Config.model_fields if f != "name"))
    if problems:
        raise SpecError("\n".join([f"invalid spec {source}:"] + problems))


def _check_range_bounds(spec: SpecBase, source: str) -> None:
    """Every value a range can produce (bounds, default, choices) must be valid for its field."""
    _check_method_branches(spec, source)
    problems: list[str] = []
    ranges = spec.search_ranges()
    for path, r in ranges.items():
        candidates = r.values if isinstance(r, Choice) else [r.low, r.high, range_default(r)]
        for value in dict.fromkeys(candidates):
            try:
                spec.resolve({path: value})
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    loc = ".".join(_user_loc(err["loc"]))
                    msg = err["msg"].removeprefix("Value error, ")
                    if loc == path:
                        problems.append(f"  {path}: the range allows {short_repr(value)}, which is not allowed here: {msg}")
                    elif loc not in ranges:  # another range's own defaults are checked on its turn
                        problems.append(f"  {loc + ': ' if loc else ''}with {path}={short_repr(value)}: {msg}")
    flat = spec.flat()
    for (path, value), branch in spec.branch_ranges().items():
        choice = ranges[path]
        if not isinstance(choice, Choice):  # (only choices have branches)
            continue
        choice_value = next(v for v in choice.values if str(v) == value)
        for sub_path, r in branch.items():
            # A choice over methods: its branches set fields of the chosen method, checked by resolving below.
            own_field = sub_path in flat or (path == "method.name" and sub_path.startswith("method."))
            if not own_field or sub_path in ranges:
                problems.append(f"  {path}.branches.{value}.{sub_path}: must name a field of the spec that holds "
                                "a fixed value (its value when this branch is not taken)")
                continue
            candidates = r.values if isinstance(r, Choice) else [r.low, r.high, range_default(r)]
            for candidate in dict.fromkeys(candidates):
                try:
                    spec.resolve({path: choice_value, sub_path: candidate})
                except ValidationError as exc:
                    for err in exc.errors(include_url=False):
                        problems.append(f"  {path}.branches.{value}.{sub_path}: the range allows {short_repr(candidate)}: "
                                        f"{err['msg'].removeprefix('Value error, ')}")
    searchable = spec.searchable_paths()
    for i, point in enumerate(spec.search.points_to_evaluate):
        unknown = sorted(set(point) - set(searchable))
        if unknown:
            problems.append(f"  search.points_to_evaluate.{i}: {', '.join(unknown)} not searched in this spec; "
                            f"searched: {', '.join(searchable) or 'nothing'}")
            continue
        try:
            spec.resolve(point)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                problems.append(f"  search.points_to_evaluate.{i}: {'.'.join(_user_loc(err['loc']))}: {err['msg']}")
    if problems:
        raise SpecError("\n".join(dict.fromkeys([f"invalid spec {source}:"] + problems)))


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """A YAML syntax error as `FILE:LINE:COLUMN: what` (1-based, as editors count), with the line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and start is not mark:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    what = f"{problem} ({context})" if context else problem
    if mark is None:
        return f"invalid spec {path}: not valid YAML: {what}"
    lines = [f"invalid spec {path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}"]
    if mark.buffer and mark.line < len(text := mark.buffer.rstrip("\0").splitlines()):
        lines += [f"  {text[mark.line]}", f"  {' ' * mark.column}^"]
    return "\n".join(lines)


def load_spec(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> SpecBase:
    """Read, override and validate a spec file. Raises SpecError with a user-facing message.

    `overrides`: `--set` strings (`"training.epochs=3"`, the value parsed as YAML), or a mapping of dotted
    field names to values (`{"training.epochs": 3}`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(f"invalid spec {path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start}); a spec is YAML in UTF-8: save it as UTF-8") from None
    try:
        raw = safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise SpecError(yaml_error(path, exc)) from None
    raw = copy.deepcopy(raw) if raw is not None else {}
    return _overridden(raw, str(path), overrides)


def _overridden(raw: Any, source: str, overrides: Sequence[str] | Mapping[str, Any]) -> SpecBase:
    if overrides:
        if isinstance(overrides, Mapping):
            source += f" (with overrides {dict(overrides)})"
        else:
            source += " (with " + " ".join(f"--set {o}" for o in overrides) + ")"
        if not isinstance(raw, dict):
            raise SpecError(f"invalid spec {source}: the file must hold a mapping of sections")
        for override in overrides:
            try:
                if isinstance(overrides, Mapping):
                    if not isinstance(override, str) or not override or any(not k for k in override.split(".")):
                        raise SpecError(f"override {override!r} must be a dotted field name such as training.epochs")
                    set_path(raw, override.split("."), overrides[override])
                else:
                    apply_override(raw, override)
            except SpecError as exc:
                raise SpecError(f"invalid spec {source}: {exc}") from None
    return _validate(raw, source)


def spec_from_dict(raw: dict, source: str = "<dict>", overrides: Sequence[str] | Mapping[str, Any] = ()) -> SpecBase:
    return _overridden(copy.deepcopy(raw), source, overrides)
