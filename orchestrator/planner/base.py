"""One validation style for the planner's types: pydantic models, frozen, unknown keys refused,
and every error one line that names the field path and the bad value, in the words of
`orchestrator/config.py` (``profile.samples[2].step_time_s: must be > 0, got -1``)."""

from __future__ import annotations

import contextvars
import datetime
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from typing_extensions import Self

from orchestrator.errors import UserError, shown
from trainers.config import fields_at, model_at

# Bounds on what the planner reads: far beyond any real job or cluster, and tight enough that its
# float64 arithmetic stays finite and above zero. Past them a figure (`grad_bytes: 1e400`, a step of
# 5e-324 s) would surface as an overflow or an invalid prediction, far from the field that caused it.
MAX_INTEGER = 2**53  # float64 holds integers (GPU counts, batches, samples) exactly up to here
MAX_BATCH = 2**31  # samples per GPU per micro-batch (and micro-batches per step): no device holds more
MAX_BYTES = 10**15  # a petabyte: gradients, device memory, one all-reduce (and parameters, a byte each)
MAX_COUNT = 10**6  # nodes, or GPUs per node (a cluster's product is held to types.MAX_GPUS)
MIN_SECONDS, MAX_SECONDS = 1e-9, 1e6  # a measured time: a nanosecond to 11.6 days
MIN_RATE, MAX_RATE = 1 / MAX_SECONDS, 1 / MIN_SECONDS  # samples/s: one per MAX_SECONDS .. one per MIN_SECONDS
MIN_GBPS, MAX_GBPS = 1e-3, 1e6  # a line rate: 1 MB/s (8 Mb/s) to 1 PB/s
MIN_EFFICIENCY = 1e-3  # achieved / line rate
MAX_LATENCY_US = 1e6  # one second per ring step
MAX_USD_PER_GPU_HOUR = 1e6
MAX_JITTER = 10.0  # a rank's step-time spread (CV) of 1,000 %; calibrate fits at most 0.5
MAX_RESIDUAL = math.log(1e6)  # log(observed / predicted): a model a million times off calibrates nothing
MAX_DEADLINE_S = 3600 * 10**6  # a million hours (114 years): no schedule; keeps hours x 3600 finite


def at_least(low: float, why: str) -> AfterValidator:
    """A floor above zero: 0 and below still read `must be > 0`, a positive figure under the floor
    (5e-324) says the floor and why."""
    def check(value: float) -> float:
        if value < low:
            raise ValueError(f"must be >= {low:g} ({why}), got {value!r}")
        return value

    return AfterValidator(check)


def utc_time(value: str) -> str:
    """An ISO 8601 time as UTC `2026-12-01T09:00:00Z` (no offset: UTC), so that the newest of
    several calibrations is the greatest string."""
    try:
        when = datetime.datetime.fromisoformat(value.strip())
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError):  # OverflowError: an offset that moves it past year 1 or 9999
        raise ValueError(f"must be an ISO 8601 time such as 2026-12-01T09:00:00Z, got {shown(value)}") from None


PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0)]
Share = Annotated[StrictFloat, Field(ge=0, le=1)]
Efficiency = Annotated[StrictFloat, Field(gt=0, le=1), at_least(MIN_EFFICIENCY, "0.1 % of the line rate")]
Text = Annotated[StrictStr, Field(min_length=1)]
UtcTime = Annotated[StrictStr, AfterValidator(utc_time)]
Batch = Annotated[StrictInt, Field(gt=0, le=MAX_BATCH)]
Count = Annotated[StrictInt, Field(gt=0, le=MAX_COUNT)]
Bytes = Annotated[StrictInt, Field(ge=0, le=MAX_BYTES)]
PositiveBytes = Annotated[StrictInt, Field(gt=0, le=MAX_BYTES)]
Seconds = Annotated[StrictFloat, Field(gt=0, le=MAX_SECONDS), at_least(MIN_SECONDS, "a nanosecond")]
SecondsOrZero = Annotated[StrictFloat, Field(ge=0, le=MAX_SECONDS)]
Rate = Annotated[StrictFloat, Field(gt=0, le=MAX_RATE), at_least(MIN_RATE, "one sample per 1e6 s")]
LineRate = Annotated[StrictFloat, Field(gt=0, le=MAX_GBPS), at_least(MIN_GBPS, "1 MB/s")]
Latency = Annotated[StrictFloat, Field(ge=0, le=MAX_LATENCY_US)]


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
        check_keys(raw, where)
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
        if not _NESTED.get():
            check_keys(data, _WHERE.get() or self.where)
        token = _NESTED.set(_NESTED.get() + 1)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            if _NESTED.get() > 1:  # inside another document, which knows the full path
                raise
            raise UserError(describe(exc, type(self), _WHERE.get() or self.where)) from None
        finally:
            _NESTED.reset(token)


def check_keys(raw: Mapping[Any, Any], where: str) -> None:
    """Every key of `raw`, nested ones too, is a string: a YAML `1: 2` or `null: 3` would reach a
    model's keyword arguments and fail there as a TypeError. (A loop, not recursion: a file may nest
    as deep as its reader allows.)"""
    todo: list[tuple[str, Any]] = [(where, raw)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise UserError(f"{path}: keys must be strings (field names), got {shown(key)}")
                todo.append((f"{path}.{key}", item))
        elif isinstance(value, (list, tuple)):
            todo.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


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
        twin = _alias_of(model_at(model, loc[:-1]), loc[-1])
        if twin:
            return f"{path}: another name for {twin}, which is given under another name too; keep one"
        allowed = fields_at(model, loc[:-1])
        return f"{path}: unknown key" + (f" (expected one of {', '.join(allowed)})" if allowed else "")
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "too_short" and isinstance(value, (list, tuple)):
        return f"{path}: must be a non-empty list, got {value!r}"
    for bound, word in _BOUNDS.items():
        if bound in ctx and kind.startswith(("greater", "less")):
            return f"{path}: must be {word} {_number(ctx[bound])}, got {shown(value)}"
    if kind in _EXPECTED:
        return f"{path}: must be {_EXPECTED[kind]}, got {shown(value)}"
    if kind == "literal_error":
        return f"{path}: must be one of {ctx.get('expected', '')}, got {shown(value)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message}" + ("" if "got" in message else f", got {shown(value)}")


def _number(limit: float) -> str:
    return f"{limit:,}" if isinstance(limit, int) and limit < 10**10 else f"{limit:g}"


def _path(where: str, loc: tuple[Any, ...]) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _join(path: str, below: str) -> str:
    if not below:
        return path
    return path + below if below.startswith("[") else f"{path}.{below}"


def _alias_of(model: type[BaseModel] | None, key: Any) -> str | None:
    """The field of `model` that `key` is another accepted name of (AliasChoices), if any."""
    for name, field in getattr(model, "model_fields", {}).items():
        choices = getattr(field.validation_alias, "choices", ())
        if key != name and key in choices:
            return name
    return None


def as_list(values: Any, where: str, what: str = "a list") -> list[Any]:
    """A list argument (any iterable but a string or a mapping), else `where: must be <what>`."""
    if isinstance(values, (str, bytes, Mapping, BaseModel)) or not isinstance(values, Iterable):
        raise UserError(f"{where}: must be {what}, got {type(values).__name__}")
    return list(values)


def check_arguments(where: str, *, integers: dict[str, Any] | None = None,
                    numbers: dict[str, Any] | None = None, at_most: dict[str, float] | None = None,
                    required: tuple[str, ...] = ()) -> None:
    """Keyword arguments of a planner function (`predict.nodes: must be > 0, got 0`); None passes
    except for the `required` ones."""
    for kinds, integer in ((integers or {}, True), (numbers or {}, False)):
        for name, value in kinds.items():
            if value is None and name in required:
                raise UserError(f"{where}.{name}: must be {'an integer' if integer else 'a number'}, got None")
            if value is None:
                continue
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type:
                raise UserError(f"{where}.{name}: must be {'an integer' if integer else 'a number'}, got {shown(value)}")
            if value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"{where}.{name}: must be a finite number, got {value!r}")
            if not value > 0:
                raise UserError(f"{where}.{name}: must be > 0, got {shown(value)}")
            if integer and value > MAX_INTEGER:
                raise UserError(f"{where}.{name}: must be <= 2**53, got {shown(value)}")
    given = {**(integers or {}), **(numbers or {})}
    for name, high in (at_most or {}).items():
        value = given.get(name)
        if value is not None and value > high:
            raise UserError(f"{where}.{name}: must be <= {_number(high)}, got {shown(value)}")


def deadline_from_hours(hours: float | None, where: str) -> float | None:
    """A deadline given in hours (a flag, a config field) as seconds; None stays None. Anything but
    a number of hours > 0 and at most MAX_DEADLINE_S is refused naming `where` and the value as
    given: 0 is not "no deadline" (leaving it out is), and 1e308 h is not an overflow inside plan()."""
    if hours is None:
        return None
    most = MAX_DEADLINE_S / 3600
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= most:
        raise UserError(f"{where}: must be a number of hours > 0 and at most {most:,.0f}, got {shown(hours)}")
    return hours * 3600
