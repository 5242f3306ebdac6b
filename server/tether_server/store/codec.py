"""Lossless conversion between domain dataclasses and JSON-shaped dicts.

The store keeps each task as JSON text, so a task must survive
``task_from_dict(json.loads(json.dumps(task_to_dict(task))))`` unchanged. The
codec is driven by the dataclasses' *type hints*, not by the runtime values,
because JSON alone cannot tell a tuple from a list or an enum from a string:

- enums are written by **name** (stable across renumbering, readable in the DB);
- ``tuple[T, ...]`` and ``frozenset[T]`` become lists (frozensets sorted, so the
  same value always gives the same text);
- nested dataclasses become nested dicts, ``X | None`` keeps ``None``;
- ``Any`` (``JSONValue``: task arguments and results) passes through untouched;
  it is JSON-shaped by contract.

Decoding is tolerant of schema evolution in the one direction that happens: a
field missing from stored data (a field added to the model later) takes its
default, and keys the model no longer has are ignored. Anything else that does
not fit raises ``ValueError`` naming the field path, e.g.
``Task.interrupt: InterruptRecord.cause: unknown InterruptCause 'FOO'``.

The per-class conversion plan is built once from the type hints and cached, so
encoding a task costs a pass over its fields and no reflection.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from tether_server.core.model import Task

__all__ = [
    "dataclass_from_dict",
    "dataclass_to_dict",
    "task_from_dict",
    "task_to_dict",
]

_T = TypeVar("_T")
_Converter = Callable[[Any], Any]


def task_to_dict(task: Task) -> dict[str, Any]:
    """Encode a task as a dict of JSON-able values (see the module docstring)."""
    return dataclass_to_dict(task)


def task_from_dict(data: Mapping[str, Any]) -> Task:
    """Rebuild a task from :func:`task_to_dict` output (or its JSON round trip)."""
    return dataclass_from_dict(Task, data)


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """Encode any model dataclass instance (e.g. ``Engine``) by its type hints."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    encoded: dict[str, Any] = _plan(type(obj)).encode(obj)
    return encoded


def dataclass_from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """Rebuild an instance of dataclass ``cls`` from :func:`dataclass_to_dict` output."""
    decoded: _T = _plan(cls).decode(data)
    return decoded


# --------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    encode: _Converter
    decode: _Converter


_PLANS: dict[type[Any], _Plan] = {}
"""Plans by class. Two threads may build the same plan at once; both results are equal."""


def _plan(cls: type[Any]) -> _Plan:
    """The encoder/decoder pair for dataclass ``cls``, built on first use."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _build_plan(cls)
    return plan


def _build_plan(cls: type[Any]) -> _Plan:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    # None stands for "as is": most fields are str/int/bool and skip a call.
    encoders: list[tuple[str, _Converter | None]] = []
    decoders: list[tuple[str, _Converter | None]] = []
    for f in fields:
        conv = _converters(hints[f.name])
        encoders.append((f.name, None if conv is _IDENTITY else conv.encode))
        decoders.append((f.name, None if conv is _IDENTITY else conv.decode))
    required = frozenset(
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    cls_name = cls.__name__

    def encode(obj: Any) -> dict[str, Any]:
        return {
            name: getattr(obj, name) if enc is None else enc(getattr(obj, name))
            for name, enc in encoders
        }

    def decode(data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls_name}: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        name = ""
        try:
            for name, dec in decoders:
                if name in data:
                    value = data[name]
                    kwargs[name] = value if dec is None else dec(value)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{cls_name}.{name}: {exc}") from exc
        if len(kwargs) < len(required) or not required <= kwargs.keys():
            missing = sorted(required - kwargs.keys())
            raise ValueError(f"{cls_name}: missing required field(s) {missing}")
        return cls(**kwargs)

    return _Plan(encode, decode)


def _identity(value: Any) -> Any:
    return value


_IDENTITY = _Plan(_identity, _identity)


def _converters(hint: Any) -> _Plan:
    """Map one type hint to the pair of functions that convert its values."""
    if hint is Any or hint in (str, int, bool, type(None)):
        return _IDENTITY
    if hint is float:
        # JSON writes 3.0 as 3.0, but a caller may have stored the int 3 in a float field;
        # coercing keeps the decoded type what the model declares.
        return _Plan(_identity, _as_float)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_plan(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _plan(hint)

    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            return _optional_plan(_converters(non_none[0]))
        raise TypeError(f"unsupported union {hint!r}: only `X | None` is supported")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence_plan(_converters(args[0]), tuple, sort=False)
    if origin is list:
        return _sequence_plan(_converters(args[0]), list, sort=False)
    if origin is frozenset:
        return _sequence_plan(_converters(args[0]), frozenset, sort=True)
    if origin is dict and args and args[0] is str:
        return _dict_plan(_converters(args[1]))
    raise TypeError(f"the store codec does not support the type {hint!r}")


def _as_float(value: Any) -> float:
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _enum_plan(enum_cls: type[enum.Enum]) -> _Plan:
    def encode(member: enum.Enum) -> str:
        return member.name

    def decode(name: Any) -> enum.Enum:
        try:
            return enum_cls[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {enum_cls.__name__} {name!r}") from None

    return _Plan(encode, decode)


def _optional_plan(inner: _Plan) -> _Plan:
    if inner is _IDENTITY:
        return _IDENTITY

    def encode(value: Any) -> Any:
        return None if value is None else inner.encode(value)

    def decode(value: Any) -> Any:
        return None if value is None else inner.decode(value)

    return _Plan(encode, decode)


def _sequence_plan(item: _Plan, container: Callable[[Any], Any], *, sort: bool) -> _Plan:
    def encode(values: Any) -> list[Any]:
        encoded = [item.encode(v) for v in values]
        if sort:
            # Sorting by JSON text works for any JSON-able item type and is deterministic.
            encoded.sort(key=functools.partial(json.dumps, sort_keys=True))
        return encoded

    def decode(values: Any) -> Any:
        if not isinstance(values, list | tuple):
            raise ValueError(f"expected a list, got {type(values).__name__}")
        return container(item.decode(v) for v in values)

    return _Plan(encode, decode)


def _dict_plan(value_plan: _Plan) -> _Plan:
    def encode(mapping: Mapping[str, Any]) -> dict[str, Any]:
        return {k: value_plan.encode(v) for k, v in mapping.items()}

    def decode(mapping: Any) -> dict[str, Any]:
        if not isinstance(mapping, Mapping):
            raise ValueError(f"expected an object, got {type(mapping).__name__}")
        return {k: value_plan.decode(v) for k, v in mapping.items()}

    return _Plan(encode, decode)
