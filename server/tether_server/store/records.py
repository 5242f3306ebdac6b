"""The plain data that crosses the store port: what is written and what a restart loads.

These types belong to the port, not to SQLite: another backend would take and
return the same records. All are frozen so a batch cannot change after it was
handed to the writer (the store also serializes a batch when it is submitted,
so later changes to the ``Task`` objects inside do not leak into the DB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tether_server.core.model import Task

__all__ = ["IdempotencyRecord", "Loaded", "StoredEvent", "WriteBatch"]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One entry of the event log, as the stream replays it after a restart.

    ``revision`` is the log position and primary key: writing the same revision
    twice is a controller bug and fails the batch. ``kind`` is the integer value
    of ``core.messages.EventKind`` (kept an ``int`` so the store need not know the
    event vocabulary). ``task`` is the full task snapshot the event carried.
    """

    revision: int
    kind: int
    task_id: str
    time: float
    chunk: str
    task: Task


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first answer to a ``request_id``, so a retry gets the same answer.

    ``fingerprint`` identifies the request's payload: the same key with another
    fingerprint is ``ALREADY_EXISTS``. Records older than 24 h are pruned.
    """

    key: str
    method: str
    fingerprint: str
    task_id: str
    created: float


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Everything one state change must make durable, written all or nothing.

    ``tasks`` are upserts by id (the last one for an id wins); ``idempotency``
    records and ``checkpoints`` (task id, JSON text) are upserts by key too;
    ``events`` are appends.
    """

    tasks: list[Task] = field(default_factory=list)
    events: list[StoredEvent] = field(default_factory=list)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    checkpoints: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What ``open()`` found on disk: the state a restarted controller starts from.

    ``epoch`` is created with the file and never changes, so resume tokens from
    another store (another controller) can be told apart. ``next_revision`` and
    ``next_seq`` are never below a value already handed out, even when the events
    that carried it have been pruned.
    """

    epoch: str
    tasks: list[Task]
    """Every live task (PENDING, RUNNING, INTERRUPTING), in submission order (``seq``);
    terminal ones stay on disk and are read on demand."""
    events: list[StoredEvent]
    """The newest retained events (at most the store's ``load_events``), by revision."""
    first_revision: int
    """The oldest revision the durable log holds (``next_revision`` when it is empty)."""
    next_revision: int
    next_seq: int
    idempotency: dict[str, IdempotencyRecord]
    """Unexpired records by key."""
