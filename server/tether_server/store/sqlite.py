"""The SQLite store: durable task records, event log, checkpoints and idempotency keys.

The controller keeps all live state in memory and treats this store as a
write-behind journal that is read back only once, by :meth:`SqliteStore.open`,
after a restart. That shapes everything here:

**One writer thread, group commit.** The asyncio loop must never wait for the
disk, so :meth:`SqliteStore.submit` only serializes the batch (on the caller's
thread, so later mutation of the ``Task`` objects cannot leak in) and queues it.
The writer thread takes *everything* queued, writes it in one transaction,
commits, and then resolves the futures. Under load, thousands of state changes
a second become tens of commits; under light load a batch is committed alone,
right away, so latency stays low.

**All or nothing per batch.** A group is first written in one go. If that
fails, the transaction is rolled back and the group is written again batch by
batch, each inside a SAVEPOINT: the batch that fails is rolled back to its
savepoint and only its future fails (with :class:`StoreWriteError`); the
others commit. A batch is never half-written, and one bad batch does not fail
its neighbours.

**Futures cannot be cancelled.** They are marked running when created, so an
``asyncio.wrap_future`` whose awaiter is cancelled cannot drop a write that the
controller has already applied in memory.

**Durability.** WAL with ``synchronous=NORMAL``: a commit survives a crash of
the process; an OS crash or power loss may lose the last few commits but never
corrupts the file. Readers (:meth:`SqliteStore.get_checkpoint`) use their own
read-only connections and run beside the writer.

**Retention.** Events beyond ``retain_events`` (newest kept) or older than
``retain_seconds`` (by the event's own ``time``) and idempotency records older
than 24 h are deleted at open and, while running, after a commit when
``prune_interval`` seconds have passed or a tenth of ``retain_events`` new
events were written. Pruning is not done on every commit: it scans the log.
Before deleting events the highest revision is remembered in ``meta``, so
revisions (and therefore resume tokens) are never handed out twice.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether_server.core.model import Task

from .codec import task_from_dict, task_to_dict
from .records import IdempotencyRecord, Loaded, StoredEvent, WriteBatch

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "SCHEMA_VERSION",
    "SqliteStore",
    "StoreError",
    "StoreWriteError",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version``; a file from a newer tether is refused."""

IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0
"""A ``request_id`` is remembered this long, then a retry counts as a new request."""

_BUSY_TIMEOUT_MS = 5_000
_HIGH_WATER_KEY = "revision_high_water"


class StoreError(Exception):
    """The store cannot do what was asked (not open, closed, or a file it cannot use)."""


class StoreWriteError(StoreError):
    """A batch was not written; nothing of it is in the database. ``__cause__`` says why."""


# --------------------------------------------------------------------------- schema
def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    conn.execute(
        "CREATE TABLE tasks ("
        " id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL,"
        " task TEXT NOT NULL, data TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX tasks_by_seq ON tasks (seq)")
    conn.execute(
        "CREATE TABLE events ("
        " revision INTEGER PRIMARY KEY, task_id TEXT NOT NULL, kind INTEGER NOT NULL,"
        " time REAL NOT NULL, chunk TEXT NOT NULL, data TEXT NOT NULL)"
    )
    conn.execute("CREATE INDEX events_by_time ON events (time)")
    conn.execute(
        "CREATE TABLE idempotency ("
        " key TEXT PRIMARY KEY, method TEXT NOT NULL, fingerprint TEXT NOT NULL,"
        " task_id TEXT NOT NULL, created REAL NOT NULL)"
    )
    conn.execute("CREATE INDEX idempotency_by_created ON idempotency (created)")
    conn.execute(
        "CREATE TABLE checkpoints (task_id TEXT PRIMARY KEY, data TEXT NOT NULL,"
        " updated REAL NOT NULL)"
    )


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # The revision makes task upserts order-independent (a retried old row never
    # overwrites a newer one), and (state, seq) finds the live tasks of a store of
    # millions at start and serves ListTasks filtered by state.
    conn.execute("ALTER TABLE tasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE tasks SET revision = coalesce(json_extract(data, '$.revision'), 0)")
    conn.execute("CREATE INDEX tasks_by_state ON tasks (state, seq)")


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _migrate_0_to_1,
    1: _migrate_1_to_2,
}
"""``_MIGRATIONS[v]`` takes the schema from version v to v + 1."""


@dataclass(frozen=True, slots=True)
class _Upsert:
    """One table's write, as single-row and as multi-row statements.

    A large group goes in ``_ROWS_PER_STATEMENT`` rows per statement: fewer
    statement steps, each of which makes sqlite3 drop and re-take the GIL
    (measured: the writer alone went from ~45k to ~62k batches/s). The statement
    text is the same each time, so it stays in sqlite3's statement cache; the
    remainder goes row by row.
    """

    table: str
    columns: tuple[str, ...]
    conflict: str | None
    """The key column to upsert on; ``None``: plain insert (a duplicate fails the batch)."""
    newer: str | None = None
    """Upsert only when this column of the new row is at least the stored one's."""

    def sql(self, rows: int) -> str:
        placeholders = "(" + ", ".join("?" * len(self.columns)) + ")"
        statement = (
            f"INSERT INTO {self.table} ({', '.join(self.columns)})"
            f" VALUES {', '.join([placeholders] * rows)}"
        )
        if self.conflict is None:
            return statement
        updates = ", ".join(f"{c} = excluded.{c}" for c in self.columns if c != self.conflict)
        statement = f"{statement} ON CONFLICT ({self.conflict}) DO UPDATE SET {updates}"
        if self.newer is not None:
            statement += f" WHERE excluded.{self.newer} >= {self.table}.{self.newer}"
        return statement

    def write(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        # Rows keep their order, so the last upsert of a key wins, in or across statements.
        whole = len(rows) - len(rows) % _ROWS_PER_STATEMENT
        if whole:
            conn.executemany(
                self.sql(_ROWS_PER_STATEMENT),
                (
                    [value for row in rows[i : i + _ROWS_PER_STATEMENT] for value in row]
                    for i in range(0, whole, _ROWS_PER_STATEMENT)
                ),
            )
        if whole < len(rows):
            conn.executemany(self.sql(1), rows[whole:])


_ROWS_PER_STATEMENT = 64
_LIVE_STATES_SQL = "'PENDING', 'RUNNING', 'INTERRUPTING'"
"""The states a restart must load (``TaskState.active`` and PENDING)."""
_TASKS = _Upsert(
    "tasks", ("id", "seq", "state", "task", "revision", "data"), conflict="id", newer="revision"
)
_EVENTS = _Upsert("events", ("revision", "task_id", "kind", "time", "chunk", "data"), None)
_IDEMPOTENCY = _Upsert(
    "idempotency", ("key", "method", "fingerprint", "task_id", "created"), conflict="key"
)
_CHECKPOINTS = _Upsert("checkpoints", ("task_id", "data", "updated"), conflict="task_id")


# --------------------------------------------------------------------------- encoding
def _dumps(task: Task) -> str:
    # ensure_ascii keeps any Python str (even a lone surrogate) storable; allow_nan (the
    # default) keeps an infinite timeout lossless.
    return json.dumps(task_to_dict(task), separators=(",", ":"))


def _loads(text: str) -> Task:
    return task_from_dict(json.loads(text))


@dataclass(slots=True, eq=False)  # identity: close() races remove one exact object
class _Pending:
    """A submitted batch, already turned into rows, and the future that reports on it."""

    future: Future[None]
    flush_marker: bool = False
    """No rows: resolved once everything queued before it is committed (see ``flush``)."""
    probe: bool = False
    """Write a heartbeat row into ``meta`` (see ``probe``)."""
    tasks: list[tuple[str, int, str, str, int, str]] = field(default_factory=list)
    events: list[tuple[int, str, int, float, str, str]] = field(default_factory=list)
    idempotency: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    checkpoints: list[tuple[str, str, float]] = field(default_factory=list)

    @classmethod
    def from_batch(cls, batch: WriteBatch, future: Future[None]) -> _Pending:
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
            events=[
                (e.revision, e.task_id, e.kind, e.time, e.chunk, dumps(e.task))
                for e in batch.events
            ],
            idempotency=[
                (r.key, r.method, r.fingerprint, r.task_id, r.created) for r in batch.idempotency
            ],
            checkpoints=[(task_id, data, now) for task_id, data in batch.checkpoints],
        )


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
        self._retain_events = retain_events
        self._retain_seconds = retain_seconds
        self._prune_interval = prune_interval
        self._prune_every_events = max(1, retain_events // 10)
        self._load_events = max(0, load_events)
        self.on_commit = on_commit

        # The hand-off to the writer takes no lock: deque.append/popleft are atomic, and
        # a lock shared by a busy submitter and the writer convoys under the GIL (measured:
        # the writer starved for most of a second while one thread submitted).
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()  # open/close state and the reader pool only
        self._opened = False
        self._closed = False

        self._conn: sqlite3.Connection | None = None  # owned by the writer thread after open()
        self._writer: threading.Thread | None = None
        self._readers: list[sqlite3.Connection] = []  # idle read-only connections
        self._events_since_prune = 0
        self._last_prune = 0.0
        self._commits = 0

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def commits(self) -> int:
        """Write transactions committed so far: with group commit, far fewer than batches."""
        return self._commits

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
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("SQLite refused WAL mode for %s (got %s)", self._path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            epoch = self._migrate(conn)
            self._prune(conn, time.time())
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
        self._last_prune = time.monotonic()
        self._writer = threading.Thread(
            target=self._run_writer, name=f"tether-store-writer:{self._path.name}", daemon=True
        )
        self._writer.start()
        return loaded

    def _migrate(self, conn: sqlite3.Connection) -> str:
        """Bring the schema to ``SCHEMA_VERSION`` and return the file's epoch."""
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                (others,) = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                ).fetchone()
                if others:
                    raise StoreError(
                        f"{self._path} is an SQLite file of something else (it has tables "
                        "but no tether schema); it was left as it is"
                    )
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} has schema version {version}; this tether reads "
                    f"up to {SCHEMA_VERSION}"
                )
            for from_version in range(version, SCHEMA_VERSION):
                _MIGRATIONS[from_version](conn)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # First creation only: the epoch identifies this file for as long as it lives.
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (uuid.uuid4().hex,)
            )
            epoch: str = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        return epoch

    def _load(self, conn: sqlite3.Connection, epoch: str) -> Loaded:
        # Only what a restart needs: the live tasks (through the (state, seq) index) and
        # the newest events. The cost of a start does not grow with the history.
        tasks = [
            _loads(data)
            for (data,) in conn.execute(
                f"SELECT data FROM tasks WHERE state IN ({_LIVE_STATES_SQL}) ORDER BY seq, id"
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
            self._high_water(conn),
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

    @staticmethod
    def _high_water(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_HIGH_WATER_KEY,)).fetchone()
        return int(row[0]) if row else 0

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
            pending = _Pending.from_batch(batch, future)
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
        marker = _Pending(future=Future(), flush_marker=True)
        try:
            self._enqueue(marker)
        except StoreError:
            return
        marker.future.result(timeout)

    def _check_usable(self) -> None:
        if not self._opened or self._closed:
            raise StoreError("the store is closed" if self._closed else "the store is not open")

    def _enqueue(self, pending: _Pending) -> None:
        self._check_usable()
        self._queue.append(pending)
        if self._closed:
            # close() ran meanwhile. If its final drain took the batch, it is written;
            # if the batch is still here, nobody will write it: take it back.
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            raise StoreError("the store is closed")
        if not self._wakeup.is_set():
            self._wakeup.set()

    def close(self) -> None:
        """Write everything still queued, stop the writer and close every connection.

        Idempotent; ``submit`` raises :class:`StoreError` afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers, self._readers = self._readers, []
        self._wakeup.set()
        if self._writer is not None:
            self._writer.join()
        if self._conn is not None:
            # Batches a submit() queued while the writer was stopping.
            self._process(self._conn, _drain(self._queue))
        for reader in readers:
            reader.close()
        # The writer's connection closes last: the last connection to a WAL database
        # checkpoints it and removes the -wal file, which a read-only one cannot do.
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _run_writer(self) -> None:
        """The writer thread: drain the queue, write it as one group, repeat until closed."""
        assert self._conn is not None
        conn = self._conn
        while True:
            group = _drain(self._queue)
            if group:
                self._process(conn, group)
            elif self._closed:
                return
            else:
                # Clearing *after* waking and draining again *before* waiting means a
                # batch appended at any moment either is drained or sets the event anew.
                self._wakeup.wait()
                self._wakeup.clear()

    def _process(self, conn: sqlite3.Connection, group: list[_Pending]) -> None:
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

    def _write_group(self, conn: sqlite3.Connection, group: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            with _transaction(conn):
                _write_rows(
                    conn,
                    tasks=[row for p in group for row in p.tasks],
                    events=[row for p in group for row in p.events],
                    idempotency=[row for p in group for row in p.idempotency],
                    checkpoints=[row for p in group for row in p.checkpoints],
                )
                if any(p.probe for p in group):
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('probe', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (repr(time.time()),),
                    )
        except Exception as exc:
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started, False)
            if len(group) == 1:
                _fail(group, exc)
            else:
                self._write_one_by_one(conn, group)
            return
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, True)
        self._commits += 1
        for pending in group:
            pending.future.set_result(None)

    def _write_one_by_one(self, conn: sqlite3.Connection, group: list[_Pending]) -> None:
        """Slow path after a group failed: isolate the failing batches with savepoints."""
        written: list[_Pending] = []
        try:
            with _transaction(conn):
                for pending in group:
                    conn.execute("SAVEPOINT batch")
                    try:
                        _write_rows(
                            conn,
                            tasks=pending.tasks,
                            events=pending.events,
                            idempotency=pending.idempotency,
                            checkpoints=pending.checkpoints,
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
        self._commits += 1
        for pending in written:
            pending.future.set_result(None)

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
    ) -> list[Task]:
        """Up to ``limit`` committed tasks with ``seq > after_seq``, by seq.

        ``states`` (TaskState names) and ``task_names`` narrow the query in SQL;
        anything else a filter asks is for the caller to check on the result.
        """
        where = ["seq > ?"]
        params: list[Any] = [after_seq]
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
        self._enqueue(_Pending(future=future, probe=True))
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
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed
                if keep:
                    self._readers.append(conn)
            if not keep:
                conn.close()

    # ------------------------------------------------------------------- retention
    def _maybe_prune(self, conn: sqlite3.Connection) -> None:
        due = (
            self._events_since_prune >= self._prune_every_events
            or time.monotonic() - self._last_prune >= self._prune_interval
        )
        if not due:
            return
        try:
            self._prune(conn, time.time())
        except Exception:
            # Pruning is housekeeping: the data is safe, the next prune will retry.
            log.exception("pruning the store failed")
        self._events_since_prune = 0
        self._last_prune = time.monotonic()

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        with _transaction(conn):
            (newest,) = conn.execute("SELECT max(revision) FROM events").fetchone()
            if newest is not None and newest > self._high_water(conn):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_HIGH_WATER_KEY, str(newest)),
                )
            # Revisions are dense (one event each), so the newest ``retain_events`` are
            # those above ``newest - retain_events``: found through the primary key, where
            # an OFFSET would walk the whole log at every start.
            if newest is not None and newest > self._retain_events:
                conn.execute(
                    "DELETE FROM events WHERE revision <= ?", (newest - self._retain_events,)
                )
            conn.execute("DELETE FROM events WHERE time < ?", (now - self._retain_seconds,))
            conn.execute(
                "DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_TTL_SECONDS,)
            )


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_rows(
    conn: sqlite3.Connection,
    *,
    tasks: list[tuple[str, int, str, str, int, str]],
    events: list[tuple[int, str, int, float, str, str]],
    idempotency: list[tuple[str, str, str, str, float]],
    checkpoints: list[tuple[str, str, float]],
) -> None:
    # A table is skipped when empty: most batches touch one or two tables.
    for table, rows in (
        (_TASKS, tasks),
        (_EVENTS, events),
        (_IDEMPOTENCY, idempotency),
        (_CHECKPOINTS, checkpoints),
    ):
        if rows:
            table.write(conn, rows)


def _drain(queue: collections.deque[_Pending]) -> list[_Pending]:
    """Take everything queued, oldest first, without a lock (popleft is atomic)."""
    group: list[_Pending] = []
    try:
        while True:
            group.append(queue.popleft())
    except IndexError:
        return group


def _fail(group: list[_Pending], cause: BaseException) -> None:
    for pending in group:
        if pending.future.done():
            continue
        failure = StoreWriteError(f"the batch was not written: {cause}")
        failure.__cause__ = cause
        pending.future.set_exception(failure)
