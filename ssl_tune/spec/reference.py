"""The spec reference page of the docs (docs/spec.md), generated from the schema so that it cannot drift.

    python -m ssl_tune.spec.reference            # print it
    python -m ssl_tune.spec.reference --write    # replace the page's generated section

`tests/test_spec.py` fails when the page's section differs from what this prints.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ssl_tune.spec import SpecBase

START, END = "<!-- spec-reference:start (generated: python -m ssl_tune.spec.reference --write) -->", "<!-- spec-reference:end -->"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
CONSTRAINTS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _is_searchable(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated and "Discriminator" in repr(get_args(annotation)[1:])


def _describe_type(annotation: Any) -> tuple[str, list[str]]:
    """(type text, constraints) of an annotation, unwrapping Searchable, Annotated and Optional."""
    constraints: list[str] = []
    searchable = _is_searchable(annotation)
    if searchable:
        annotation = get_args(get_args(annotation)[0])[0]  # Union[Annotated[T, ..., Tag], range] -> Annotated[T, ..., Tag]
    while get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        for m in meta:
            for item in getattr(m, "metadata", []) or [m]:
                for name, symbol in CONSTRAINTS.items():
                    if getattr(item, name, None) is not None:
                        constraints.append(f"{symbol} {getattr(item, name)}")
        annotation = base
    origin = get_origin(annotation)
    if origin is Literal:
        text = " \\| ".join(f"`{v}`" for v in get_args(annotation))
    elif origin in (Union, types.UnionType):
        described = [_describe_type(a) for a in get_args(annotation) if a is not type(None)]
        constraints += [c for _, cs in described for c in cs]  # Optional[Annotated[float, ge=0]]: the float's
        text = " \\| ".join(t for t, _ in described) + (" or null" if type(None) in get_args(annotation) else "")
    elif origin in (list, tuple, dict):
        text = f"{origin.__name__}[{', '.join(_describe_type(a)[0] for a in get_args(annotation))}]"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    if searchable:
        text += " or range"
    return text, constraints


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"  # type: ignore[call-arg]  # ours take no argument
    value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{value}`" if value is not None else "null"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation if not field.metadata else Annotated[tuple([field.annotation, *field.metadata])]
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            rows += _rows(inner, f"{path}.")
            continue
        text, constraints = _describe_type(annotation)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{path}` | {text} | {', '.join(constraints)} | {_default(field)} | {description} |")
    return rows


def reference_markdown(methods: dict[str, Any] | None = None) -> str:
    """The reference of the shared sections and of each method's config (default: the built-in methods)."""
    from trainers import builtin_methods

    header = ["| field | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    lines = ["Every field, its type (\"or range\": searchable), the allowed values and the default.", ""]
    lines += header + [r for r in _rows(SpecBase, "") if r]
    for name, method in (methods if methods is not None else builtin_methods()).items():
        lines += ["", f"`method` with `name: {name}`:", ""] + header + _rows(method.Config, "method.")
    return "\n".join(lines)


def generated_section(text: str) -> str:
    return text[text.index(START) + len(START) : text.index(END)].strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the generated section of {PAGE}")
    args = parser.parse_args()
    generated = reference_markdown()
    if not args.write:
        print(generated)
        return
    text = PAGE.read_text()
    PAGE.write_text(text[: text.index(START) + len(START)] + "\n" + generated + "\n" + text[text.index(END) :])


if __name__ == "__main__":
    main()
