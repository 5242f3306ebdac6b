"""Checking that what a task hands back (results, checkpoints) is plain JSON.

Results travel to the controller pickled, then become a ``google.protobuf.Value``; only
JSON-shaped data survives that trip unchanged, so the runtime checks it on the engine,
where the error can still name the task and the offending path.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

__all__ = ["MAX_CHECKPOINT_BYTES", "JSONValue", "encoded_size", "to_json_value"]

JSONValue = Any
"""None, bool, int, float, str, list or dict (str keys) of those."""

MAX_CHECKPOINT_BYTES: Final = 1024 * 1024
"""Largest checkpoint state accepted, measured as compact UTF-8 JSON."""

_MAX_DEPTH: Final = 200


def to_json_value(value: Any, what: str = "value") -> JSONValue:
    """Return ``value`` as plain JSON data (tuples become lists), or raise ``TypeError``.

    Rejected: non-string keys, non-finite floats, and any other type (sets, bytes, numpy
    scalars...). The message names the path of the first offending element, e.g.
    ``value['rows'][3]: set is not JSON``.
    """
    return _convert(value, what, 0)


def encoded_size(value: JSONValue) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _convert(value: Any, path: str, depth: int) -> JSONValue:
    if depth > _MAX_DEPTH:
        raise TypeError(f"{path}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # plain int, also for IntEnum and other subclasses
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{path}: {value!r} is not a finite number")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_convert(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        converted: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: key {key!r} is not a string")
            converted[key] = _convert(item, f"{path}[{key!r}]", depth + 1)
        return converted
    raise TypeError(f"{path}: {type(value).__name__} is not JSON")
