"""The SQLite file's layout: tables, migrations, the statements that write rows, retention.

Everything here works on a connection it is given, inside a transaction it is given or
opens with :func:`transaction`; nothing keeps state. :class:`~.sqlite.SqliteStore`
creates or upgrades the file with :func:`migrate`, its writer thread (:mod:`.writer`)
writes rows with :func:`write_rows` and prunes with :meth:`Retention.prune`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StoreError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "IDEMPOTENCY_TTL_SECONDS",
    "LIVE_STATES_SQL",
    "SCHEMA_VERSION",
    "Retention",
    "migrate",
    "migrate_0_to_1",
    "migrate_1_to_2",
    "migrate_2_to_3",
    "stored_high_water",
    "transaction",
    "write_rows",
]

SCHEMA_VERSION = 3
"""Stored in ``PRAGMA user_version``; a file from a newer tether is refused."""

IDEMPOTENCY_TTL_SECONDS = 24 * 3600.0
"""A ``request_id`` is remembered this long, then a retry counts as a new request."""

BUSY_TIMEOUT_MS = 5_000
_HIGH_WATER_KEY = "revision_high_water"

LIVE_STATES_SQL = "'PENDING', 'RUNNING', 'INTERRUPTING'"
"""The states a restart must load (``TaskState.active`` and PENDING)."""


# --------------------------------------------------------------------------- migrations
def migrate_0_to_1(conn: sqlite3.Connection) -> None:
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


def migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # The revision makes task upserts order-independent (a retried old row never
    # overwrites a newer one), and (state, seq) finds the live tasks of a store of
    # millions at start and serves ListTasks filtered by state.
    conn.execute("ALTER TABLE tasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE tasks SET revision = coalesce(json_extract(data, '$.revision'), 0)")
    conn.execute("CREATE INDEX tasks_by_state ON tasks (state, seq)")


def migrate_2_to_3(conn: sqlite3.Connection) -> None:
    # Each task's labels, by (key, value, seq): a label filter (ListTasks, a stream's
    # initial state) is answered from the index instead of decoding every task's JSON,
    # which made 1,000 streams opening on 20,000 stored tasks take minutes.
    conn.execute(
        "CREATE TABLE task_labels (key TEXT NOT NULL, value TEXT NOT NULL,"
        " seq INTEGER NOT NULL, PRIMARY KEY (key, value, seq)) WITHOUT ROWID"
    )
    conn.execute(
        "INSERT OR IGNORE INTO task_labels (key, value, seq)"
        " SELECT label.key, label.value, tasks.seq"
        " FROM tasks, json_each(tasks.data, '$.labels') AS label"
    )


_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: migrate_0_to_1,
    1: migrate_1_to_2,
    2: migrate_2_to_3,
}
"""``_MIGRATIONS[v]`` takes the schema from version v to v + 1."""


def migrate(conn: sqlite3.Connection, path: Path) -> str:
    """Bring the schema of the file at ``path`` to ``SCHEMA_VERSION`` and return its epoch."""
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            (others,) = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
            ).fetchone()
            if others:
                raise StoreError(
                    f"{path} is an SQLite file of something else (it has tables "
                    "but no tether schema); it was left as it is"
                )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}; this tether reads up to {SCHEMA_VERSION}"
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


# --------------------------------------------------------------------------- rows
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
    """The key column to upsert on; ``None``: plain insert (a duplicate fails the batch,
    unless ``keep_existing``)."""
    newer: str | None = None
    """Upsert only when this column of the new row is at least the stored one's."""
    keep_existing: bool = False
    """A plain insert that skips a row already there (``INSERT OR IGNORE``)."""

    def sql(self, rows: int) -> str:
        placeholders = "(" + ", ".join("?" * len(self.columns)) + ")"
        verb = "INSERT OR IGNORE" if self.keep_existing else "INSERT"
        statement = (
            f"{verb} INTO {self.table} ({', '.join(self.columns)})"
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
_TASKS = _Upsert(
    "tasks", ("id", "seq", "state", "task", "revision", "data"), conflict="id", newer="revision"
)
_EVENTS = _Upsert("events", ("revision", "task_id", "kind", "time", "chunk", "data"), None)
_IDEMPOTENCY = _Upsert(
    "idempotency", ("key", "method", "fingerprint", "task_id", "created"), conflict="key"
)
_CHECKPOINTS = _Upsert("checkpoints", ("task_id", "data", "updated"), conflict="task_id")
_LABELS = _Upsert("task_labels", ("key", "value", "seq"), None, keep_existing=True)
"""A task's labels never change: a row that is there already stays."""


def write_rows(
    conn: sqlite3.Connection,
    *,
    tasks: list[tuple[str, int, str, str, int, str]],
    events: list[tuple[int, str, int, float, str, str]],
    idempotency: list[tuple[str, str, str, str, float]],
    checkpoints: list[tuple[str, str, float]],
    labels: list[tuple[str, str, int]],
) -> None:
    """Upsert task, idempotency and checkpoint rows, insert event rows and the tasks'
    ``labels`` (key, value, seq) into the label index, in order."""
    # A table is skipped when empty: most batches touch one or two tables.
    for table, rows in (
        (_TASKS, tasks),
        (_EVENTS, events),
        (_IDEMPOTENCY, idempotency),
        (_CHECKPOINTS, checkpoints),
        (_LABELS, labels),
    ):
        if rows:
            table.write(conn, rows)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- retention
def stored_high_water(conn: sqlite3.Connection) -> int:
    """The highest revision pruned from the log so far (0: none)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_HIGH_WATER_KEY,)).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class Retention:
    """What the log keeps: the newest ``events`` events, none older than ``seconds``
    (by the event's own ``time``); idempotency records for ``IDEMPOTENCY_TTL_SECONDS``."""

    events: int
    seconds: float

    def prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete what is past retention, in one transaction; remember the high water first."""
        with transaction(conn):
            (newest,) = conn.execute("SELECT max(revision) FROM events").fetchone()
            if newest is not None and newest > stored_high_water(conn):
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (_HIGH_WATER_KEY, str(newest)),
                )
            # Revisions are dense (one event each), so the newest ``events`` are those
            # above ``newest - events``: found through the primary key, where an OFFSET
            # would walk the whole log at every start.
            if newest is not None and newest > self.events:
                conn.execute("DELETE FROM events WHERE revision <= ?", (newest - self.events,))
            conn.execute("DELETE FROM events WHERE time < ?", (now - self.seconds,))
            conn.execute(
                "DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_TTL_SECONDS,)
            )
