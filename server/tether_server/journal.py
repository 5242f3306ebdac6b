"""The journal: the controller's one path to the store, and the store's health.

Two rules carry tether's data guarantees (DESIGN §13), and both live here:

**Acknowledge only what is durable.** A new task's record is written by
:meth:`Journal.record_new` *before* the controller hands the task to the core,
so a SubmitTask is answered, and a task dispatched, only after its record is
committed. That write is a batch of its own: when it fails (disk full, I/O
error, the file locked by another process) nothing of it is in the database,
nothing of it is in memory, and the caller refuses the request with
``STORE_UNAVAILABLE``. A refused request leaves no trace.

**Nothing accepted is lost.** Every later change (state, events, checkpoints)
goes into the loop turn's open batch, and the store's group commit writes the
batches of many turns in one transaction. A batch that fails is not dropped:
it joins the *backlog*, the journal reports itself unhealthy (health
NOT_SERVING, submits refused), and a retry loop writes the backlog, oldest
first, until the store takes it. Meanwhile new batches queue behind the
backlog, so events reach the disk in revision order. Task rows are upserted
only by a newer revision (``store.schema``), so a retried old row never
overwrites a newer one that got through. When the store writes again, the
journal is healthy and tether serves again, without a restart.

The backlog is bounded only by the work that runs during an outage (accepted
tasks finishing, their events); no new work is accepted meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .core import errors as err
from .store import SqliteStore, StoreError, WriteBatch

log = logging.getLogger(__name__)


class Journal:
    """Batches the controller's writes per loop turn and keeps them until they are durable."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        on_health: Callable[[bool], None],
        on_committed: Callable[[WriteBatch], None],
        retry_interval: float = 1.0,
    ) -> None:
        self.store = store
        self._on_health = on_health
        self._on_committed = on_committed
        self._retry_interval = retry_interval
        self._batch: WriteBatch | None = None
        self._batch_future: asyncio.Future[None] | None = None
        self._backlog: list[WriteBatch] = []
        self._retrying: asyncio.Task[None] | None = None
        self._closed = False
        self.healthy = True
        self.last_error = ""

    # ------------------------------------------------------------------ durable first
    async def record_new(self, batch: WriteBatch) -> None:
        """Commit ``batch`` (a new task's record) now; raise StoreUnavailable if it was not.

        The batch is written alone or not at all, and a failure leaves nothing
        behind in the journal either: the request it belongs to is refused.
        """
        if not self.healthy:
            raise self._unavailable()
        try:
            await asyncio.wrap_future(self.store.submit(batch))
        except StoreError as exc:
            self._mark_unhealthy(exc)
            raise self._unavailable() from None

    # ------------------------------------------------------------------ write behind
    def batch(self) -> WriteBatch:
        """The batch of this loop turn; it is flushed right after the turn."""
        if self._batch is None:
            self._batch = WriteBatch(tasks=[], events=[], idempotency=[], checkpoints=[])
            self.schedule_flush()
        return self._batch

    def schedule_flush(self) -> None:
        if self._batch_future is None:
            loop = asyncio.get_running_loop()
            self._batch_future = loop.create_future()
            loop.call_soon(self._flush)

    async def flush(self) -> None:
        """Wait until everything batched so far is committed, or kept in the backlog."""
        if self._batch is not None and self._batch_future is None:
            self.schedule_flush()
        if self._batch_future is not None:
            await asyncio.shield(self._batch_future)

    @property
    def backlog_size(self) -> int:
        """Batches waiting for the store to write again."""
        return len(self._backlog)

    def _flush(self) -> None:
        batch, fut = self._batch, self._batch_future
        self._batch, self._batch_future = None, None
        if fut is None:
            return
        if batch is None:
            fut.set_result(None)
            return
        if self._backlog or self._closed:
            # Behind a failed batch: keep the order; the retry loop writes both.
            self._backlog.append(batch)
            fut.set_result(None)
            return
        try:
            cf = self.store.submit(batch)
        except StoreError as exc:
            self._keep(batch, exc)
            fut.set_result(None)
            return
        chained = asyncio.wrap_future(cf)
        chained.add_done_callback(lambda f: self._written(batch, f, fut))

    def _written(
        self, batch: WriteBatch, done: asyncio.Future[None], fut: asyncio.Future[None]
    ) -> None:
        exc = None if done.cancelled() else done.exception()
        if exc is None and not done.cancelled():
            self._on_committed(batch)
        else:
            self._keep(batch, exc)
        if not fut.done():
            fut.set_result(None)

    def _keep(self, batch: WriteBatch, exc: BaseException | None) -> None:
        self._backlog.append(batch)
        self._mark_unhealthy(exc)

    # ------------------------------------------------------------------ recovery
    def _mark_unhealthy(self, exc: BaseException | None) -> None:
        self.last_error = _describe(exc)
        if self.healthy:
            log.error(
                "the store cannot write (%s); refusing new tasks until it can", self.last_error
            )
            self.healthy = False
            self._on_health(False)
        if self._retrying is None and not self._closed:
            self._retrying = asyncio.ensure_future(self._retry_loop())

    async def _retry_loop(self) -> None:
        try:
            wrote = False
            while not self._closed:
                if not wrote:
                    await asyncio.sleep(self._retry_interval)
                wrote = await self._write_backlog()
                if wrote and not self._backlog:
                    log.warning("the store writes again; serving")
                    self.healthy = True
                    self.last_error = ""
                    self._on_health(True)
                    return
        finally:
            self._retrying = None

    async def _write_backlog(self) -> bool:
        """Write the backlog as one batch; True when the store took it (or the probe passed).

        Batches that join the backlog meanwhile stay for the next round."""
        pending = list(self._backlog)
        merged = WriteBatch(tasks=[], events=[], idempotency=[], checkpoints=[])
        for b in pending:
            merged.tasks.extend(b.tasks)
            merged.events.extend(b.events)
            merged.idempotency.extend(b.idempotency)
            merged.checkpoints.extend(b.checkpoints)
        try:
            if pending:
                await asyncio.wrap_future(self.store.submit(merged))
            else:  # a refused submit made us unhealthy: probe with an empty transaction
                await asyncio.to_thread(self.store.probe)
        except StoreError as exc:
            self.last_error = _describe(exc)
            return False
        del self._backlog[: len(pending)]
        for b in pending:
            self._on_committed(b)
        return True

    def _unavailable(self) -> err.StoreUnavailable:
        return err.StoreUnavailable(
            f"the store cannot write ({self.last_error}); nothing was recorded, "
            "retry with the same request_id",
            metadata={"cause": self.last_error[:200]},
        )

    # ------------------------------------------------------------------ shutdown
    async def close(self) -> None:
        """Flush what is open, give the backlog one last try, then stop retrying."""
        with contextlib.suppress(Exception):
            await self.flush()
        if self._backlog:
            with contextlib.suppress(Exception):
                await self._write_backlog()
            if self._backlog:
                log.error(
                    "%d batches could not be written before shutdown: %s",
                    len(self._backlog),
                    self.last_error,
                )
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()


def _describe(exc: BaseException | None) -> str:
    """What went wrong in the store, in words: the SQLite error behind a StoreWriteError."""
    if exc is None:
        return "unknown"
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {cause}"
