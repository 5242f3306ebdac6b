"""The store's writer thread: batches in, group commits out.

**One writer thread, group commit.** The asyncio loop must never wait for the
disk, so :meth:`SqliteStore.submit` only serializes the batch (on the caller's
thread, so later mutation of the ``Task`` objects cannot leak in: :class:`Pending`)
and queues it. The writer thread takes *everything* queued, writes it in one
transaction, commits, and then resolves the futures. Under load, thousands of state
changes a second become tens of commits; under light load a batch is committed
alone, right away, so latency stays low.

**All or nothing per batch.** A group is first written in one go. If that
fails, the transaction is rolled back and the group is written again batch by
batch, each inside a SAVEPOINT: the batch that fails is rolled back to its
savepoint and only its future fails (with :class:`StoreWriteError`); the
others commit. A batch is never half-written, and one bad batch does not fail
its neighbours.

**Futures cannot be cancelled.** They are marked running when created, so an
``asyncio.wrap_future`` whose awaiter is cancelled cannot drop a write that the
controller has already applied in memory.

The writer also prunes the log (:class:`~.schema.Retention`) after a commit when
``prune_interval`` seconds have passed or a tenth of the retained events were written.
"""

from __future__ import annotations

import collections
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from tether_server.core.model import Task

from .codec import task_to_dict
from .errors import StoreError, StoreWriteError
from .records import WriteBatch
from .schema import Retention, transaction, write_rows

__all__ = ["GroupWriter", "Pending"]

log = logging.getLogger("tether_server.store.sqlite")
"""The store's one logger, whichever of its modules writes the line."""


def _dumps(task: Task) -> str:
    # ensure_ascii keeps any Python str (even a lone surrogate) storable; allow_nan (the
    # default) keeps an infinite timeout lossless.
    return json.dumps(task_to_dict(task), separators=(",", ":"))


@dataclass(slots=True, eq=False)  # identity: close() races remove one exact object
class Pending:
    """A submitted batch, already turned into rows, and the future that reports on it."""

    future: Future[None]
    flush_marker: bool = False
    """No rows: resolved once everything queued before it is committed (see ``flush``)."""
    probe: bool = False
    """Write a heartbeat row into ``meta`` (see ``probe``)."""
    tasks: list[tuple[str, int, str, str, int, str]] = field(default_factory=list)
    labels: list[tuple[str, str, int]] = field(default_factory=list)
    """(key, value, seq) of the tasks' labels, for the label index; only with a task's
    first record (PENDING, attempt 0): labels never change after it."""
    events: list[tuple[int, str, int, float, str, str]] = field(default_factory=list)
    idempotency: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    checkpoints: list[tuple[str, str, float]] = field(default_factory=list)

    @classmethod
    def from_batch(cls, batch: WriteBatch, future: Future[None]) -> Pending:
        # A state change usually upserts a task and logs an event that carries the very
        # same snapshot: serialize each distinct object once (half the cost of a submit).
        # Keying by id() is safe because ``batch`` keeps every object alive meanwhile.
        texts: dict[int, str] = {}

        def dumps(task: Task) -> str:
            text = texts.get(id(task))
            if text is None:
                text = texts[id(task)] = _dumps(task)
            return text

        now = time.time()
        return cls(
            future=future,
            tasks=[(t.id, t.seq, t.state.name, t.task, t.revision, dumps(t)) for t in batch.tasks],
            labels=[
                (key, value, t.seq)
                for t in batch.tasks
                if t.attempt == 0
                for key, value in t.labels.items()
            ],
            events=[
                (e.revision, e.task_id, e.kind, e.time, e.chunk, dumps(e.task))
                for e in batch.events
            ],
            idempotency=[
                (r.key, r.method, r.fingerprint, r.task_id, r.created) for r in batch.idempotency
            ],
            checkpoints=[(task_id, data, now) for task_id, data in batch.checkpoints],
        )


class GroupWriter:
    """The queue of one store and the daemon thread that writes it.

    Made with the store, so batches may be queued while the store opens; ``start(conn)``
    starts the thread once the file is ready, ``stop()`` ends it after writing what is
    queued. ``report(seconds, ok)`` is called on the writer thread after each write
    transaction.
    """

    def __init__(
        self,
        *,
        name: str,
        retention: Retention,
        prune_interval: float,
        report: Callable[[float, bool], None],
    ) -> None:
        self._name = name
        self._retention = retention
        self._prune_interval = prune_interval
        self._prune_every_events = max(1, retention.events // 10)
        self._report = report

        # The hand-off to the writer takes no lock: deque.append/popleft are atomic, and
        # a lock shared by a busy submitter and the writer convoys under the GIL (measured:
        # the writer starved for most of a second while one thread submitted).
        self._queue: collections.deque[Pending] = collections.deque()
        self._wakeup = threading.Event()
        self._stopping = False

        self._conn: sqlite3.Connection | None = None  # owned by the writer thread
        self._thread: threading.Thread | None = None
        self._events_since_prune = 0
        self._last_prune = 0.0
        self.commits = 0
        """Write transactions committed so far: with group commit, far fewer than batches."""

    def start(self, conn: sqlite3.Connection) -> None:
        """Start writing through ``conn`` (just pruned: the next prune is an interval away)."""
        self._conn = conn
        self._last_prune = time.monotonic()
        self._thread = threading.Thread(target=self._run_writer, name=self._name, daemon=True)
        self._thread.start()

    def enqueue(self, pending: Pending) -> None:
        """Queue ``pending`` for the thread; :class:`StoreError` if ``stop`` came first."""
        self._queue.append(pending)
        if self._stopping:
            # stop() ran meanwhile. If its final drain took the batch, it is written;
            # if the batch is still here, nobody will write it: take it back.
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            raise StoreError("the store is closed")
        if not self._wakeup.is_set():
            self._wakeup.set()

    def stop(self) -> None:
        """Stop the thread and write what was queued while it stopped. The connection is
        left open (the store closes it last)."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            # Batches a submit() queued while the writer was stopping.
            self._process(self._conn, _drain(self._queue))

    def _run_writer(self) -> None:
        """The writer thread: drain the queue, write it as one group, repeat until stopped."""
        assert self._conn is not None
        conn = self._conn
        while True:
            group = _drain(self._queue)
            if group:
                self._process(conn, group)
            elif self._stopping:
                return
            else:
                # Clearing *after* waking and draining again *before* waiting means a
                # batch appended at any moment either is drained or sets the event anew.
                self._wakeup.wait()
                self._wakeup.clear()

    def _process(self, conn: sqlite3.Connection, group: list[Pending]) -> None:
        """Write one group, prune if due, then release the flushes queued among it."""
        batches = [p for p in group if not p.flush_marker]
        try:
            if batches:
                self._write_group(conn, batches)
                self._events_since_prune += sum(len(p.events) for p in batches)
                self._maybe_prune(conn)
        except Exception as exc:  # a bug here must not leave waiters hanging
            log.exception("store writer failed")
            _fail(batches, exc)
        finally:
            for pending in group:
                if pending.flush_marker:
                    pending.future.set_result(None)

    def _write_group(self, conn: sqlite3.Connection, group: list[Pending]) -> None:
        started = time.perf_counter()
        try:
            with transaction(conn):
                write_rows(
                    conn,
                    tasks=[row for p in group for row in p.tasks],
                    events=[row for p in group for row in p.events],
                    idempotency=[row for p in group for row in p.idempotency],
                    checkpoints=[row for p in group for row in p.checkpoints],
                    labels=[row for p in group for row in p.labels],
                )
                if any(p.probe for p in group):
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('probe', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (repr(time.time()),),
                    )
        except Exception as exc:
            self._report(time.perf_counter() - started, False)
            if len(group) == 1:
                _fail(group, exc)
            else:
                self._write_one_by_one(conn, group)
            return
        self._report(time.perf_counter() - started, True)
        self.commits += 1
        for pending in group:
            pending.future.set_result(None)

    def _write_one_by_one(self, conn: sqlite3.Connection, group: list[Pending]) -> None:
        """Slow path after a group failed: isolate the failing batches with savepoints."""
        written: list[Pending] = []
        try:
            with transaction(conn):
                for pending in group:
                    conn.execute("SAVEPOINT batch")
                    try:
                        write_rows(
                            conn,
                            tasks=pending.tasks,
                            events=pending.events,
                            idempotency=pending.idempotency,
                            checkpoints=pending.checkpoints,
                            labels=pending.labels,
                        )
                    except Exception as exc:
                        conn.execute("ROLLBACK TO batch")
                        _fail([pending], exc)
                    else:
                        written.append(pending)
                    finally:
                        conn.execute("RELEASE batch")
        except Exception as exc:
            # The transaction itself failed (COMMIT, or an error that made SQLite roll
            # back on its own): nothing of the group is on disk. Already-failed batches
            # keep their own error.
            _fail(group, exc)
            return
        self.commits += 1
        for pending in written:
            pending.future.set_result(None)

    def _maybe_prune(self, conn: sqlite3.Connection) -> None:
        due = (
            self._events_since_prune >= self._prune_every_events
            or time.monotonic() - self._last_prune >= self._prune_interval
        )
        if not due:
            return
        try:
            self._retention.prune(conn, time.time())
        except Exception:
            # Pruning is housekeeping: the data is safe, the next prune will retry.
            log.exception("pruning the store failed")
        self._events_since_prune = 0
        self._last_prune = time.monotonic()


def _drain(queue: collections.deque[Pending]) -> list[Pending]:
    """Take everything queued, oldest first, without a lock (popleft is atomic)."""
    group: list[Pending] = []
    try:
        while True:
            group.append(queue.popleft())
    except IndexError:
        return group


def _fail(group: list[Pending], cause: BaseException) -> None:
    for pending in group:
        if pending.future.done():
            continue
        failure = StoreWriteError(f"the batch was not written: {cause}")
        failure.__cause__ = cause
        pending.future.set_exception(failure)
