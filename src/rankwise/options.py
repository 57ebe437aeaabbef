"""Checking option values against the type annotations of a config dataclass.

Adapter configs and compression methods are frozen dataclasses whose fields are the
options a user passes (``attach(..., dropout=0.1)``, ``rankwise compress -o damp=0.01``).
:func:`coerce` checks one value against its field's annotation, so a wrong type is a
:class:`~rankwise.errors.ConfigError` naming the option and the expected type, never a
``TypeError`` deep inside the method; :func:`type_name` spells the annotation for that message.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Union


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached per class)."""
    return typing.get_type_hints(cls)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _is_mapping(hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return isinstance(origin, type) and issubclass(origin, Mapping)


def type_name(hint: Any) -> str:
    """A readable name of an annotation: ``float | None`` -> "float or None"."""
    if _is_union(hint):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any value"
    if typing.get_origin(hint) is tuple:
        return f"a list of {type_name(typing.get_args(hint)[0])}"
    if _is_mapping(hint):
        return "a JSON object (mapping)"
    origin = typing.get_origin(hint) or hint
    return getattr(origin, "__name__", str(origin))


def coerce(value: object, hint: Any) -> tuple[bool, object]:
    """``(ok, value)``: whether ``value`` fits ``hint``, and the value in the field's form.

    A bool is not an int; an int is a float (returned as float); a list or a single item
    fits ``tuple[X, ...]`` (returned as a tuple).
    """
    if hint is Any:
        return True, value
    if _is_union(hint):
        for option in typing.get_args(hint):
            ok, out = coerce(value, option)
            if ok:
                return True, out
        return False, value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        items = list(value) if isinstance(value, list | tuple) else [value]
        checked = [coerce(v, item) for v in items]
        return all(ok for ok, _ in checked), tuple(v for _, v in checked)
    if _is_mapping(hint):
        return isinstance(value, Mapping), value
    if hint is type(None):
        return value is None, value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    origin = typing.get_origin(hint) or hint
    return (not isinstance(origin, type) or isinstance(value, origin)), value


__all__ = ["coerce", "field_types", "type_name"]
