"""The SQLite store: durable task records, event log, checkpoints and idempotency keys.

The controller keeps all live state in memory and treats this store as a
write-behind journal that is read back only once, by :meth:`SqliteStore.open`,
after a restart. That shapes everything here:

**One writer thread, group commit, all or nothing per batch.** ``submit`` turns a
batch into rows on the caller's thread and queues it; one writer thread commits
everything queued in one transaction, isolating a failing batch with savepoints
(:mod:`.writer` explains how). The futures it resolves cannot be cancelled.

**Durability.** WAL with ``synchronous=NORMAL``: a commit survives a crash of
the process; an OS crash or power loss may lose the last few commits but never
corrupts the file. Readers (:meth:`SqliteStore.get_checkpoint` and the other
queries) use their own read-only connections and run beside the writer.

**Retention.** Events beyond ``retain_events`` (newest kept) or older than
``retain_seconds`` (by the event's own ``time``) and idempotency records older
than 24 h are deleted at open and, while running, after a commit when
``prune_interval`` seconds have passed or a tenth of ``retain_events`` new
events were written. Pruning is not done on every commit: it scans the log.
Before deleting events the highest revision is remembered in ``meta``, so
revisions (and therefore resume tokens) are never handed out twice.

The file's tables, migrations and write statements are in :mod:`.schema`; this
module holds the store's life cycle and its queries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tether_server.core.model import Task

from .codec import task_from_dict
from .errors import StoreError, StoreWriteError
from .records import IdempotencyRecord, Loaded, StoredEvent, WriteBatch
from .schema import (
    BUSY_TIMEOUT_MS,
    IDEMPOTENCY_TTL_SECONDS,
    LIVE_STATES_SQL,
    SCHEMA_VERSION,
    Retention,
    migrate,
    stored_high_water,
)
from .writer import GroupWriter, Pending

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "SCHEMA_VERSION",
    "SqliteStore",
    "StoreError",
    "StoreWriteError",
]

log = logging.getLogger(__name__)


def _loads(text: str) -> Task:
    return task_from_dict(json.loads(text))


# --------------------------------------------------------------------------- the store
class SqliteStore:
    """The durable store of one controller, in one SQLite file.

    Life cycle: ``open()`` once (creates or upgrades the file, loads it, starts
    the writer thread), then any number of ``submit()`` / ``get_checkpoint()`` /
    ``flush()`` from any thread, then ``close()``. The writer is a daemon thread,
    so a forgotten ``close()`` cannot hang interpreter exit; it loses what was
    still queued instead (SQLite itself stays consistent).
    """

    def __init__(
        self,
        path: Path,
        *,
        retain_events: int = 200_000,
        retain_seconds: float = 7 * 86400,
        prune_interval: float = 10.0,
        load_events: int = 5_000,
        on_commit: Callable[[float, bool], None] | None = None,
    ) -> None:
        """``prune_interval``: the most seconds between two prunes while writes come in;
        ``load_events``: how many of the newest events ``open`` loads (older ones are
        read on demand with :meth:`events_after`); ``on_commit(seconds, ok)``: called on
        the writer thread after each write transaction."""
        if retain_events < 1:
            raise ValueError("retain_events must be at least 1")
        if retain_seconds <= 0:
            raise ValueError("retain_seconds must be positive")
        self._path = Path(path)
        self._retention = Retention(events=retain_events, seconds=retain_seconds)
        self._load_events = max(0, load_events)
        self.on_commit = on_commit

        # Made now, so a batch submitted while open() runs waits in its queue.
        self._writer = GroupWriter(
            name=f"tether-store-writer:{self._path.name}",
            retention=self._retention,
            prune_interval=prune_interval,
            report=self._report_commit,
        )
        self._lock = threading.Lock()  # open/close state and the reader pool only
        self._opened = False
        self._closed = False

        self._conn: sqlite3.Connection | None = None  # the writer thread's after open()
        self._readers: list[sqlite3.Connection] = []  # idle read-only connections

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def commits(self) -> int:
        """Write transactions committed so far: with group commit, far fewer than batches."""
        return self._writer.commits

    # ------------------------------------------------------------------- open / load
    def open(self) -> Loaded:
        """Create or upgrade the file, prune it, load it, and start the writer thread.

        Blocking; call it once, before the service starts taking requests.
        """
        with self._lock:
            if self._opened or self._closed:
                raise StoreError("SqliteStore.open() may be called only once")
            self._opened = True
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            with self._lock:
                self._closed = True
            raise StoreError(f"cannot open the store {self._path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("SQLite refused WAL mode for %s (got %s)", self._path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            epoch = migrate(conn, self._path)
            self._retention.prune(conn, time.time())
            loaded = self._load(conn, epoch)
        except sqlite3.DatabaseError as exc:
            conn.close()
            with self._lock:
                self._closed = True
            raise StoreError(
                f"the store {self._path} is unreadable or corrupt ({exc}); it was left as it "
                "is: restore it from a backup, or move it away to start with an empty store"
            ) from exc
        except BaseException:
            conn.close()
            with self._lock:
                self._closed = True
            raise
        self._conn = conn
        self._writer.start(conn)
        return loaded

    def _load(self, conn: sqlite3.Connection, epoch: str) -> Loaded:
        # Only what a restart needs: the live tasks (through the (state, seq) index) and
        # the newest events. The cost of a start does not grow with the history.
        tasks = [
            _loads(data)
            for (data,) in conn.execute(
                f"SELECT data FROM tasks WHERE state IN ({LIVE_STATES_SQL}) ORDER BY seq, id"
            )
        ]
        tail = conn.execute(
            "SELECT revision, task_id, kind, time, chunk, data FROM events"
            " ORDER BY revision DESC LIMIT ?",
            (self._load_events,),
        ).fetchall()
        events = [
            StoredEvent(revision, kind, task_id, event_time, chunk, _loads(data))
            for revision, task_id, kind, event_time, chunk, data in reversed(tail)
        ]
        (oldest,) = conn.execute("SELECT min(revision) FROM events").fetchone()
        idempotency = {
            key: IdempotencyRecord(key, method, fingerprint, task_id, created)
            for key, method, fingerprint, task_id, created in conn.execute(
                "SELECT key, method, fingerprint, task_id, created FROM idempotency"
            )
        }
        (max_seq,) = conn.execute("SELECT max(seq) FROM tasks").fetchone()
        # Revisions are never reused: take the highest one still in the log, the highest
        # one pruned, and the highest one a live task carries. (Every task change is
        # written with its event, so a terminal task's revision is covered by the first
        # two.)
        high_water = max(
            events[-1].revision if events else 0,
            stored_high_water(conn),
            max((t.revision for t in tasks), default=0),
        )
        return Loaded(
            epoch=epoch,
            tasks=tasks,
            events=events,
            first_revision=oldest if oldest is not None else high_water + 1,
            next_revision=high_water + 1,
            next_seq=(max_seq or 0) + 1,
            idempotency=idempotency,
        )

    # ------------------------------------------------------------------- writes
    def submit(self, batch: WriteBatch) -> Future[None]:
        """Queue ``batch`` for the writer and return at once.

        The future resolves to ``None`` once the batch is committed, or fails with
        :class:`StoreWriteError` if none of it could be written (a batch that
        cannot even be serialized fails the same way, without being queued).
        Raises :class:`StoreError` if the store is not open or already closed.
        """
        self._check_usable()
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # a write, once asked for, cannot be cancelled
        try:
            pending = Pending.from_batch(batch, future)
        except Exception as exc:  # e.g. a task argument that is not JSON-shaped
            failure = StoreWriteError(f"cannot serialize the batch: {exc}")
            failure.__cause__ = exc
            future.set_exception(failure)
            return future
        self._enqueue(pending)
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every batch submitted before this call is committed (or has failed).

        Also waits for the pruning that those commits made due. Raises ``TimeoutError``
        if that takes longer than ``timeout`` seconds. Returns at once on a store that
        is not open, or closed (``close`` flushed it).
        """
        marker = Pending(future=Future(), flush_marker=True)
        try:
            self._enqueue(marker)
        except StoreError:
            return
        marker.future.result(timeout)

    def _check_usable(self) -> None:
        if not self._opened or self._closed:
            raise StoreError("the store is closed" if self._closed else "the store is not open")

    def _enqueue(self, pending: Pending) -> None:
        self._check_usable()
        self._writer.enqueue(pending)

    def _report_commit(self, seconds: float, ok: bool) -> None:
        if self.on_commit is not None:
            self.on_commit(seconds, ok)

    def close(self) -> None:
        """Write everything still queued, stop the writer and close every connection.

        Idempotent; ``submit`` raises :class:`StoreError` afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers, self._readers = self._readers, []
        self._writer.stop()
        for reader in readers:
            reader.close()
        # The writer's connection closes last: the last connection to a WAL database
        # checkpoints it and removes the -wal file, which a read-only one cannot do.
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------- reads
    def get_checkpoint(self, task_id: str) -> str | None:
        """The last checkpoint (JSON text) committed for ``task_id``, or ``None``.

        Safe from any thread; it reads through a pooled read-only connection, so it
        neither waits for nor blocks the writer. A checkpoint still queued is not seen.
        """
        with self._reader() as conn:
            row = conn.execute(
                "SELECT data FROM checkpoints WHERE task_id = ?", (task_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def get_task(self, task_id: str) -> Task | None:
        """The committed record of one task, or ``None``. Safe from any thread."""
        with self._reader() as conn:
            row = conn.execute("SELECT data FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else _loads(row[0])

    def list_tasks(
        self,
        *,
        after_seq: int,
        limit: int,
        states: Sequence[str] = (),
        task_names: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> list[Task]:
        """Up to ``limit`` committed tasks with ``seq > after_seq``, by seq.

        ``states`` (TaskState names), ``task_names`` and ``labels`` (each key with that
        value, through the label index) narrow the query in SQL; anything else a filter
        asks is for the caller to check on the result.
        """
        where = ["seq > ?"]
        params: list[Any] = [after_seq]
        for key, value in (labels or {}).items():
            where.append(
                "seq IN (SELECT seq FROM task_labels WHERE key = ? AND value = ? AND seq > ?)"
            )
            params.extend((key, value, after_seq))
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if task_names:
            where.append(f"task IN ({', '.join('?' * len(task_names))})")
            params.extend(task_names)
        params.append(limit)
        sql = f"SELECT data FROM tasks WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        with self._reader() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_loads(data) for (data,) in rows]

    def events_after(self, revision: int, *, before: int, limit: int) -> list[StoredEvent]:
        """Committed events with ``revision < r < before``, oldest first, at most ``limit``."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT revision, task_id, kind, time, chunk, data FROM events"
                " WHERE revision > ? AND revision < ? ORDER BY revision LIMIT ?",
                (revision, before, limit),
            ).fetchall()
        return [
            StoredEvent(rev, kind, task_id, event_time, chunk, _loads(data))
            for rev, task_id, kind, event_time, chunk, data in rows
        ]

    def oldest_event_revision(self) -> int | None:
        """The oldest revision the durable log still holds (retention moves it)."""
        with self._reader() as conn:
            (oldest,) = conn.execute("SELECT min(revision) FROM events").fetchone()
        return None if oldest is None else int(oldest)

    def probe(self) -> None:
        """Write and commit a tiny row: raises :class:`StoreWriteError` while the store
        cannot write (used to find out when a full disk has room again)."""
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()
        self._enqueue(Pending(future=future, probe=True))
        future.result(timeout=30)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_usable()
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,  # pooled: each use is by one thread at a time
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed
                if keep:
                    self._readers.append(conn)
            if not keep:
                conn.close()
