"""Task history: what the controller serves about tasks that are no longer live.

Memory holds live work only (DESIGN §13). The core's table keeps PENDING,
RUNNING and INTERRUPTING tasks, and terminal ones only until their final
record is committed (``ControlCore.forget``). After that a task is served from
a small LRU cache of recently finished tasks, then from SQLite. Likewise the
in-memory event log holds the newest events only; a stream that resumes from
further back is replayed from the store's log first.

Reads see their own writes: before the store is asked, the journal is flushed,
so anything the controller already published is on disk (or, while the store
cannot write, still in memory: finished tasks stay pinned in the core until
their record is written).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from .core.eventlog import LogEntry
from .core.filters import TaskFilter
from .core.machine import ControlCore
from .core.messages import EventKind
from .core.model import Task
from .core.records import snapshot
from .journal import Journal
from .store import SqliteStore, StoredEvent

REPLAY_PAGE = 1_000
"""Events read from the store per query while a stream replays old history."""
MAX_SCAN = 5_000
"""Rows one ListTasks call reads at most: a filter SQL cannot narrow (labels) that matches
little ends its page early, with a token to go on, rather than scanning millions of rows."""


def entry_of(ev: StoredEvent) -> LogEntry:
    """A stored event as the event log holds it (with an empty cell for its serialization)."""
    return LogEntry(ev.revision, EventKind(ev.kind), ev.task, ev.time, ev.chunk, [None])


class TaskHistory:
    """Live tasks from the core, recent terminal ones from a cache, the rest from SQLite."""

    def __init__(self, store: SqliteStore, journal: Journal, *, cache_size: int) -> None:
        self.store = store
        self.journal = journal
        self.cache_size = max(1, cache_size)
        self._cache: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self.core: ControlCore | None = None

    # ------------------------------------------------------------------ the cache
    def remember(self, task: Task) -> None:
        """Keep a terminal snapshot (a copy nobody mutates) near at hand."""
        self._cache[task.id] = task
        self._cache.move_to_end(task.id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cached(self, task_id: str) -> Task | None:
        """A task known in memory: live in the core, or recently finished."""
        core = self.core
        if core is not None:
            task = core.tasks.get(task_id)
            if task is not None:
                return task
        task = self._cache.get(task_id)
        if task is not None:
            self._cache.move_to_end(task_id)
        return task

    # ------------------------------------------------------------------ reads
    async def get(self, task_id: str) -> Task | None:  # async: a future store may need I/O
        """The freshest version of a task, wherever it lives; None if it never existed."""
        task = self.cached(task_id)
        if task is not None:
            return task
        # A primary-key read of one row takes tens of microseconds: cheaper on the loop
        # than a hop to a thread (which waits for the GIL, up to its 5 ms switch interval,
        # when other threads are busy). WAL readers never wait for the writer.
        stored = self.store.get_task(task_id)
        if stored is not None and stored.state.terminal:
            self.remember(stored)
        return stored

    async def _list_by_id(
        self, flt: TaskFilter, after_seq: int, limit: int
    ) -> tuple[list[Task], int | None]:
        """A filter on names: each task looked up by id (at most 1,000), no table scan.

        Clients that watch many handles list exactly their tasks this way; scanning
        the table by seq for them would cost a page of rows per thousand tasks stored.
        """
        found = [task for task in map(self.cached, flt.ids) if task is not None]
        missing = flt.ids - {task.id for task in found}
        if missing:
            stored = await asyncio.to_thread(lambda: [self.store.get_task(i) for i in missing])
            found.extend(task for task in stored if task is not None)
        tasks = sorted(
            (task for task in found if task.seq > after_seq and flt.matches(task)),
            key=lambda task: task.seq,
        )
        if len(tasks) > limit:
            return tasks[:limit], tasks[limit - 1].seq
        return tasks, None

    async def list(
        self, flt: TaskFilter, after_seq: int, limit: int
    ) -> tuple[list[Task], int | None]:
        """Tasks with seq > after_seq matching ``flt``: (page, last seq or None at the end).

        The store is queried by seq (narrowed by state, task name and labels in SQL) and
        each row is replaced by the version in memory when that is newer. A page may
        come back short, with a cursor, after ``MAX_SCAN`` rows (AIP-158 allows it).
        """
        await self._barrier()
        if flt.ids:
            return await self._list_by_id(flt, after_seq, limit)
        page: list[Task] = []
        cursor = after_seq
        states = [s.name for s in flt.states]
        names = list(flt.tasks)
        scanned = 0
        while True:
            if scanned >= MAX_SCAN:
                return page, cursor
            want = limit + 1 - len(page)
            rows = await asyncio.to_thread(
                self.store.list_tasks,
                after_seq=cursor,
                limit=max(want, 100),
                states=states,
                task_names=names,
                labels=flt.labels,
            )
            scanned += len(rows)
            for row in rows:
                cursor = row.seq
                task = self._fresher(row)
                if flt.matches(task):
                    if len(page) == limit:
                        return page, page[-1].seq
                    page.append(task)
            if len(rows) < max(want, 100):
                return page, None

    async def replay(self, revision: int, *, through: int) -> AsyncIterator[LogEntry]:
        """Events with ``revision < r <= through`` from the store, oldest first.

        ``through`` is the memory log's ``evicted_through`` when the stream opened:
        the caller takes every later event from memory (``EventLog.since``) in the
        same loop turn as it subscribes, so nothing is missed or repeated.
        """
        before = through + 1
        await self._barrier()
        cursor = revision
        while cursor < before - 1:
            rows = await asyncio.to_thread(
                self.store.events_after, cursor, before=before, limit=REPLAY_PAGE
            )
            if not rows:
                return
            for ev in rows:
                cursor = ev.revision
                yield entry_of(ev)

    async def stored_since(self, revision: int) -> bool:
        """Whether the store's log still holds every event after ``revision``."""
        oldest = await asyncio.to_thread(self.store.oldest_event_revision)
        return oldest is not None and revision >= oldest - 1

    async def matching(self, flt: TaskFilter) -> AsyncIterator[Task]:
        """Every task matching ``flt``, by seq, in pages (for a stream's initial state)."""
        after = 0
        while True:
            page, last = await self.list(flt, after, 500)
            for task in page:
                yield snapshot(task, keep_output=True)
            if last is None:
                return
            after = last

    # ------------------------------------------------------------------ helpers
    async def _barrier(self) -> None:
        """Make what was published so far readable from the store."""
        await self.journal.flush()

    def _fresher(self, row: Task) -> Task:
        mine = self.cached(row.id)
        if mine is not None and mine.revision >= row.revision:
            return mine
        return row
