"""Search ranges, the values a spec field may take instead of a fixed value (`ssl_tune.spec.Searchable`):
``uniform``, ``loguniform``, ``int`` and ``choice``, each with an optional ``default`` (what `ssl-tune train`
and the confirmation's default configuration use)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

T = TypeVar("T")


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class _FloatRange(StrictModel):
    low: float
    high: float
    default: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> _FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Uniform(_FloatRange):
    type: Literal["uniform"]

    def centre(self) -> float:
        return (self.low + self.high) / 2


class LogUniform(_FloatRange):
    type: Literal["loguniform"]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"low must be > 0 for a loguniform range (got {self.low})")
        return self

    def centre(self) -> float:
        return math.sqrt(self.low * self.high)


class IntRange(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False
    default: int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"low must be > 0 for a log int range (got {self.low})")
        return self

    def centre(self) -> int:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return self.low + self.step * round((mid - self.low) / self.step)


class Choice(StrictModel):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    default: Any = None
    branches: dict[str, dict[str, "Range"]] = Field(
        default_factory=dict,
        description="conditional sub-ranges: {value: {field.path: range}}, searched only when that value is "
        "chosen; the fields hold a fixed value in the spec, used when their branch is not taken",
    )

    @model_validator(mode="after")
    def _branches(self) -> Choice:
        unknown = sorted(set(self.branches) - {str(v) for v in self.values})
        if unknown:
            raise ValueError(f"branches {unknown} are not among the values {self.values}")
        if any(isinstance(r, Choice) and r.branches for b in self.branches.values() for r in b.values()):
            raise ValueError("branches cannot nest: a branch's choice has no branches of its own")
        return self

    def centre(self) -> Any:
        return self.values[0]


Range = Annotated[Union[Uniform, LogUniform, IntRange, Choice], Field(discriminator="type")]
RANGE_TYPES = (Uniform, LogUniform, IntRange, Choice)
Choice.model_rebuild()



def _fixed_or_range(value: Any) -> str:
    return "range" if isinstance(value, (dict, BaseModel)) else "fixed"


# A field that holds a fixed value of type T or a search range over such values. The
# discriminator validates only one branch, so an error speaks of what the user wrote.
if TYPE_CHECKING:
    # To the type checker a searchable field is its value: code reads fields of resolved specs only (a trial's,
    # `SpecBase.resolve`'s; `Trainer` refuses any other), and the code that handles ranges (`search_ranges`,
    # `resolve`, the search space) walks them as values of any type.
    Searchable = Annotated[T, "searchable"]
else:
    Searchable = Annotated[
        Union[Annotated[T, Tag("fixed")], Annotated[Range, Tag("range")]], Discriminator(_fixed_or_range)
    ]


def range_default(r: Uniform | LogUniform | IntRange | Choice) -> Any:
    """The value `ssl-tune train` uses for a range: its `default`, else its centre."""
    return r.default if r.default is not None else r.centre()


class SpecError(Exception):
    """A spec file or override that is not valid; the message is meant for the user as is."""


def set_path(raw: dict, keys: list[str], value: Any) -> None:
    """Set `raw[k0][k1]...` = value, creating sections on the way."""
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SpecError(f"field `{'.'.join(keys[: i + 1])}` holds a value, not a section")
        node = child
    node[keys[-1]] = value
