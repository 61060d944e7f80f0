"""A name -> object registry, for models and data sets.

A duplicate name is a programming error (ValueError at import); an unknown name comes from the
user's config, so it is a UserError that names the config field and lists what exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from trainers.errors import UserError, shown

T = TypeVar("T")
R = TypeVar("R")

# Config values arrive from YAML, so only these plain types can be checked against annotations.
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


class Registry(Generic[T]):
    """``kind`` names an entry in messages; ``field`` is its config path ("model.name")."""

    def __init__(self, *, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            available = ", ".join(self.names())
            raise UserError(f"{self.field}: unknown {self.kind} {shown(name)}; available: {available}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def call_with_kwargs(
    fn: Callable[..., R], kwargs: Mapping[str, Any], *, field: str, args: tuple[Any, ...] = ()
) -> R:
    """``fn(*args, **kwargs)``, where ``kwargs`` came from config field ``field``.

    A keyword ``fn`` does not take, or a value of the wrong plain type, is reported as a
    UserError naming the field, instead of a TypeError from deep inside the call.
    """
    bound = bind_kwargs(fn, kwargs, field=field, args=args)
    return fn(*bound.args, **bound.kwargs)


def bind_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], *, field: str,
                args: tuple[Any, ...] = ()) -> inspect.BoundArguments:
    """The call `fn(*args, **kwargs)` would make, checked as `call_with_kwargs` says, without making it."""
    signature = inspect.signature(fn, eval_str=True)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        accepted = ", ".join(list(signature.parameters)[len(args) :])
        raise UserError(f"{field}: {fn.__name__}() {exc}; accepted: {accepted}") from None
    for key, value in kwargs.items():
        _check_type(f"{field}.{key}", signature.parameters[key].annotation, value)
    return bound


def _check_type(where: str, annotation: Any, value: Any) -> None:
    allowed = _PLAIN_TYPES.get(getattr(annotation, "__name__", ""))
    # bool is an int subclass, but `width: true` in YAML is certainly a mistake.
    if allowed and (isinstance(value, bool) or not isinstance(value, allowed)):
        raise UserError(f"{where}: must be {annotation.__name__}, got {shown(value)}")
