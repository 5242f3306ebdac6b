"""The controller's event log in memory: the last ``max_events`` published events.

Every ``Publish`` of the control core becomes one ``LogEntry``, appended in
revision order. Streams replay from it after a resume token, then go live. The
log is bounded by count: when an entry falls off, every token at or before its
revision can no longer be resumed without a gap, and ``since`` says so
(``ResumeTokenExpired``, cause ``expired``) instead of silently skipping events.
The durable log with retention by age lives in the store; this one serves the
live streams.

``LogEntry.payload`` is an opaque slot for the serialized message: the
controller serializes an event once and every subscriber shares the bytes.

Tokens are minted and read by ``core.tokens``; the codecs are re-exported here,
where the API layer looks for them (resume tokens are this log's cursors).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .errors import ResumeTokenExpired
from .messages import EventKind, Publish
from .model import Task
from .tokens import decode_page_token, decode_token, encode_page_token, encode_token

__all__ = [
    "EventLog",
    "LogEntry",
    "decode_page_token",
    "decode_token",
    "encode_page_token",
    "encode_token",
]


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event: a change to a task, with the task snapshot after it."""

    revision: int
    kind: EventKind
    task: Task
    """Snapshot; never mutated after it was published."""
    time: float
    chunk: str = ""
    payload: object = None
    """The serialized message, filled by the controller; the log never looks inside."""

    @classmethod
    def from_publish(cls, publish: Publish, payload: object = None) -> LogEntry:
        return cls(
            publish.revision, publish.kind, publish.task, publish.time, publish.chunk, payload
        )


class EventLog:
    """A bounded, revision-ordered log of the events of one controller epoch.

    ``evicted_through`` is the highest revision that is *not* held although it
    existed: 0 for a fresh controller, or, for a restarted one that reloads only
    the tail of its durable log, the revision just below the first entry it
    appends. Tokens at or above it can be resumed; older ones cannot.
    """

    def __init__(self, epoch: str, max_events: int, *, evicted_through: int = 0) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        if evicted_through < 0:
            raise ValueError("evicted_through must not be negative")
        self.epoch = epoch
        self.max_events = max_events
        self._entries: deque[LogEntry] = deque()
        self._evicted_through = evicted_through

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def latest_revision(self) -> int:
        """Revision of the newest event (``evicted_through`` while none is held):
        the position a fresh token should name to mean "from now on"."""
        return self._entries[-1].revision if self._entries else self._evicted_through

    @property
    def oldest_revision(self) -> int:
        """Revision of the oldest event held (the next one's lower bound when none is)."""
        return self._entries[0].revision if self._entries else self._evicted_through + 1

    @property
    def evicted_through(self) -> int:
        """The oldest revision a token may name and still resume without a gap."""
        return self._evicted_through

    def append(self, entry: LogEntry) -> None:
        """Add the newest event, evicting the oldest beyond ``max_events``."""
        if entry.revision <= self.latest_revision:
            raise ValueError(
                f"revision {entry.revision} does not follow {self.latest_revision}; "
                "the log only grows"
            )
        self._entries.append(entry)
        if len(self._entries) > self.max_events:
            self._evicted_through = self._entries.popleft().revision

    def since(self, revision: int) -> list[LogEntry]:
        """Every event held with a revision above ``revision``, oldest first.

        Raises ResumeTokenExpired when an event after ``revision`` was evicted
        (cause ``expired``), and when ``revision`` is beyond the newest event
        (cause ``ahead_of_log``): such a token names history this log never had,
        e.g. events lost by a crash before they were stored, and resuming from it
        could skip the events that reuse those revisions.
        """
        if revision < self._evicted_through:
            raise ResumeTokenExpired(
                f"events after revision {revision} are no longer retained; list the tasks "
                "again (ListTasks returns a fresh resume_token) and watch from there",
                metadata={"cause": "expired", "oldestRevision": str(self.oldest_revision)},
            )
        if revision > self.latest_revision:
            raise ResumeTokenExpired(
                f"revision {revision} is beyond the newest event ({self.latest_revision}); "
                "list the tasks again and watch from the fresh resume_token",
                metadata={"cause": "ahead_of_log", "latestRevision": str(self.latest_revision)},
            )
        newer: list[LogEntry] = []
        for entry in reversed(self._entries):  # resumes are usually near the end
            if entry.revision <= revision:
                break
            newer.append(entry)
        newer.reverse()
        return newer
