"""Dataclasses to JSON and back, checked against their type annotations.

`to_json` is `dataclasses.asdict` with tuples as lists; `from_json(cls, data)` rebuilds the nested
dataclasses, lists, tuples, dicts, Literals and optional fields, and raises a `ValueError` naming
the field (`results.tables[2].columns[0].summary.mean`) when a value does not fit, so a malformed or
hand-edited file reads as one clear error instead of a KeyError deep in a report.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A JSON-able copy: dataclasses as dicts, tuples as lists, enums as their values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


def from_json(cls: type[T], data: Any, path: str = "") -> T:
    """An instance of the dataclass `cls` from `to_json`'s output."""
    return typing.cast(T, _convert(cls, data, path or cls.__name__))


def _fail(path: str, expected: str, value: Any) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"{path}: expected {expected}, got {shown}")


def _convert(annotation: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if annotation is Any or annotation is object:  # a JSON value of any shape (a step's identity)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option in arguments:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{path}: no type fits ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in arguments:
            raise _fail(path, f"one of {list(arguments)}", value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _fail(path, "a list", value)
        item_type = arguments[0] if arguments else Any
        items = [_convert(item_type, item, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, "an object", value)
        value_type = arguments[1] if len(arguments) == 2 else Any
        return {key: _convert(value_type, item, f"{path}.{key}") for key, item in value.items()}
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _dataclass(annotation, value, path)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            raise _fail(path, f"one of {[m.value for m in annotation]}", value) from None
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, "a number", value)
        return float(value)
    if annotation in (int, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise _fail(path, annotation.__name__, value)
        return value
    if annotation is dict or annotation is list:
        if not isinstance(value, annotation):
            raise _fail(path, annotation.__name__, value)
        return value
    raise TypeError(f"{path}: no JSON conversion for {annotation!r}")


def _dataclass(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _fail(path, f"an object ({cls.__name__})", value)
    hints = typing.get_type_hints(cls)
    arguments = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name not in value:
            has_default = (
                field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            )
            if has_default:
                continue
            raise ValueError(f"{path}: missing field {field.name!r}")
        arguments[field.name] = _convert(hints[field.name], value[field.name], f"{path}.{field.name}")
    return cls(**arguments)
