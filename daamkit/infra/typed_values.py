"""Type checks for values that come from files (TOML options, JSON configs) or from Python callers.

Type hints say what a field holds; `coerce` checks one value against its hint and returns it in the
hinted type (an int where a float is expected becomes a float, a string where a path is expected becomes
a Path), so `lr = "fast"` or `data = 5` is reported by name instead of failing somewhere deep inside.
Error messages name the field in backticks (`lr`); the CLI turns such names into its --flags.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from daamkit.infra.errors import DaamkitError

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (list, tuple):
        return f"a list, each {_describe(args[0])}" if args else "a list"
    if args:  # Optional[X] / Union
        return " or ".join(_describe(a) for a in args)
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` checked against type hint `hint` (bool, int, float, str, Path, Optional/list of them).

    Returns the value converted to the hinted type; raises DaamkitError naming `name` otherwise.
    Hints it does not know (e.g. Any, a class) pass the value through unchanged.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, option)
            except DaamkitError:
                continue
        raise DaamkitError(f"`{name}` must be {_describe(hint)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise DaamkitError(f"`{name}` must be {_describe(hint)}, got {value!r}")
        items = [coerce(name, item, args[0]) for item in value] if args else list(value)
        return origin(items)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, (str, Path)),
    }.get(hint)
    if ok is None:
        return value
    if not ok:
        raise DaamkitError(f"`{name}` must be {_describe(hint)}, got {value!r}")
    return float(value) if hint is float else Path(value) if hint is Path else value


def check_field_types(instance: Any) -> None:
    """Coerce every field of dataclass `instance` to its type hint in place (ints given for floats
    become floats); DaamkitError naming the first field of the wrong type."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        coerced = coerce(field.name, value, hints[field.name])
        if coerced is not value:
            object.__setattr__(instance, field.name, coerced)
