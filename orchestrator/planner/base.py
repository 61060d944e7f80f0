"""One validation style for the planner's types: pydantic models, frozen, unknown keys refused,
and every error one line that names the field path and the bad value, in the words of
`orchestrator/config.py` (``profile.samples[2].step_time_s: must be > 0, got -1``)."""

from __future__ import annotations

import contextvars
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from typing_extensions import Self

from orchestrator.errors import UserError

PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0)]
Share = Annotated[StrictFloat, Field(ge=0, le=1)]
Efficiency = Annotated[StrictFloat, Field(gt=0, le=1)]
Text = Annotated[StrictStr, Field(min_length=1)]


_NESTED = contextvars.ContextVar("planner_document_depth", default=0)
_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("planner_validation_where", default=None)


class FieldError(ValueError):
    """A cross-field check's error, with the path below the model that raised it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


class Model(BaseModel):
    """Base of every planner type. Built in code (`Profile(...)`) or read (`Profile.from_dict`),
    a bad value is a `UserError` naming `where` and the field path."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)
    where: ClassVar[str] = "value"

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Self:
        where = where or cls.where
        if not isinstance(raw, Mapping):
            raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
        token = _WHERE.set(where)
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise UserError(describe(exc, cls, where)) from None
        finally:
            _WHERE.reset(token)

    @classmethod
    def coerce(cls, value: Any, where: str) -> Self:
        """`value` itself when it is one already, read from a mapping (`from_dict`) when it is one,
        else a `UserError`: what the public functions take for each model argument."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value, where)
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise UserError(f"{where}: must be {article} {cls.__name__} or a mapping, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without unset optional fields (None, empty lists and mappings)."""
        data = self.model_dump(mode="json", exclude_none=True)
        return {k: v for k, v in data.items() if v not in ([], {})}

    @classmethod
    def load(cls, path: str | Path) -> Self:
        from orchestrator.planner.io import load_json  # io builds on these types

        return load_json(cls, path)

    def save(self, path: str | Path) -> Path:
        from orchestrator.planner.io import save_json

        return save_json(self, path)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like a new one (frozen models have no setters)."""
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


class Document(Model):
    """A model a user writes or reads as a whole (a profile, a cluster, a plan, an observation):
    built in code as well, a bad value is the same one-line `UserError`. (Only these override
    `__init__`: pydantic calls an overriding `__init__` for every nested instance too.)"""

    def __init__(self, /, **data: Any) -> None:
        token = _NESTED.set(_NESTED.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _NESTED.get() > 1:  # inside another document, which knows the full path
                raise
            raise UserError(describe(exc, type(self), _WHERE.get() or self.where)) from None
        finally:
            _NESTED.reset(token)


# ---------------------------------------------------------------------------------------------
# ValidationError -> one line


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a non-empty string",
    "string_too_short": "a non-empty string", "bool_type": "true or false", "tuple_type": "a list",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "finite_number": "finite",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def describe(exc: ValidationError, model: type[BaseModel], where: str | None = None) -> str:
    """The first error of `exc` as ``where.path: what is wrong, got value``."""
    errors = exc.errors()
    # A misspelt key also shows as a required field missing: name the misspelling.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = error["loc"]
    path = _path(where or getattr(model, "where", "value"), loc)
    kind, value = error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, FieldError):
        return f"{_join(path, inner.path)}: {inner.message}"
    if kind == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return f"{path}: unknown key" + (f" (expected one of {', '.join(allowed)})" if allowed else "")
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "too_short" and isinstance(value, (list, tuple)):
        return f"{path}: must be a non-empty list, got {value!r}"
    for bound, word in _BOUNDS.items():
        if bound in ctx and kind.startswith(("greater", "less")):
            return f"{path}: must be {word} {ctx[bound]:g}, got {value!r}"
    if kind in _EXPECTED:
        return f"{path}: must be {_EXPECTED[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected', '')}, got {value!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}" + ("" if "got" in message else f", got {value!r}")


def _path(where: str, loc: tuple[Any, ...]) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _join(path: str, below: str) -> str:
    if not below:
        return path
    return path + below if below.startswith("[") else f"{path}.{below}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that `loc` leads to (for "expected one of ...")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `tuple[X, ...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (typing.Union, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def as_list(values: Any, where: str, what: str = "a list") -> list[Any]:
    """A list argument (any iterable but a string or a mapping), else `where: must be <what>`."""
    if isinstance(values, (str, bytes, Mapping, BaseModel)) or not isinstance(values, Iterable):
        raise UserError(f"{where}: must be {what}, got {type(values).__name__}")
    return list(values)


# The planner computes in float64: integers beyond 2**53 (GPU counts, batches, samples) would not
# be exact in it, and no real job comes near.
MAX_INTEGER = 2**53


def check_arguments(where: str, *, integers: dict[str, Any] | None = None,
                    numbers: dict[str, Any] | None = None, at_most: dict[str, float] | None = None) -> None:
    """Keyword arguments of a planner function (`predict.nodes: must be > 0, got 0`); None passes."""
    for kinds, integer in ((integers or {}, True), (numbers or {}, False)):
        for name, value in kinds.items():
            if value is None:
                continue
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type:
                raise UserError(f"{where}.{name}: must be {'an integer' if integer else 'a number'}, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"{where}.{name}: must be a finite number, got {value!r}")
            if not value > 0:
                raise UserError(f"{where}.{name}: must be > 0, got {value!r}")
            if integer and value > MAX_INTEGER:
                raise UserError(f"{where}.{name}: must be <= 2**53, got {value!r}")
    for name, high in (at_most or {}).items():
        value = (numbers or {}).get(name)
        if value is not None and value > high:
            raise UserError(f"{where}.{name}: must be <= {high:g}, got {value!r}")
