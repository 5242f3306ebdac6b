"""The persistence port: what makes a controller's state survive a restart.

The controller keeps every live record in memory and hands each state change to
the store as a :class:`WriteBatch`; the store writes it in the background (one
writer thread, group commit) and reads everything back once, at start, as a
:class:`Loaded`. The only backend is SQLite in WAL mode (:class:`SqliteStore`);
:mod:`.codec` turns domain dataclasses into JSON and back, losslessly.

Inside: :mod:`.sqlite` (``SqliteStore``: open and load, submit, close, the queries),
:mod:`.writer` (its writer thread and group commit), :mod:`.schema` (tables,
migrations, write statements, retention), :mod:`.records` and :mod:`.errors`.

This package imports the stdlib and ``tether_server.core`` only.
"""

from .codec import dataclass_from_dict, dataclass_to_dict, task_from_dict, task_to_dict
from .records import IdempotencyRecord, Loaded, StoredEvent, WriteBatch
from .sqlite import (
    IDEMPOTENCY_TTL_SECONDS,
    SCHEMA_VERSION,
    SqliteStore,
    StoreError,
    StoreWriteError,
)

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "SCHEMA_VERSION",
    "IdempotencyRecord",
    "Loaded",
    "SqliteStore",
    "StoreError",
    "StoreWriteError",
    "StoredEvent",
    "WriteBatch",
    "dataclass_from_dict",
    "dataclass_to_dict",
    "task_from_dict",
    "task_to_dict",
]
