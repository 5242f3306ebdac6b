"""The asyncio client's outcome stream: :class:`AsyncOutcomeWatcher`, one per ``AsyncClient``.

The twin of ``_sync_outcomes``: one background asyncio task reads the client's
single outcome stream and resolves an ``asyncio.Future`` per waiting ``result()``
(or ``map`` item), as ``_outcomes.OutcomeBoard`` decides. It starts on the first
wait, in the loop of that wait, and ends with ``AsyncClient.close``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from tether import _core, _outcomes, _watch
from tether._async_watch import _error, stop_reader
from tether._exceptions import ResumeTokenExpired, TetherError, Unavailable
from tether._models import Task

if TYPE_CHECKING:
    from tether._async import AsyncClient, AsyncTaskHandle

__all__ = ["AsyncOutcomeWatcher", "map_results"]

_CLOSED = "the client was closed while waiting for the task"


class AsyncOutcomeWatcher:
    """One stream of terminal events shared by every wait of a :class:`tether.AsyncClient`.

    Single-threaded like asyncio itself: the board is touched only between awaits.
    See ``tether._outcomes`` for why no terminal event is lost.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._board: _outcomes.OutcomeBoard[asyncio.Future[Task]] = _outcomes.OutcomeBoard()
        self._machine: _watch.WatchMachine | None = None
        self._reader: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        """True while the stream's reader task runs."""
        return self._reader is not None and not self._reader.done()

    def mark(self) -> _outcomes.Coverage | None:
        """The coverage a submit sent now gets (None while the stream is not running)."""
        return self._board.mark() if self.running else None

    async def start(self) -> None:
        """Starts the stream if it is not running: a fresh token first, then the reader."""
        if self.running:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.running:
                return
            if self._closed:
                raise TetherError(_CLOSED, code=grpc.StatusCode.CANCELLED)
            token = await self._start_token()
            self._machine = _outcomes.outcome_machine(self._client._config.retry, token)
            stale = self._board.restart()
            self._reader = asyncio.ensure_future(self._run())
        await self._check(stale)

    async def begin(self, name: str, coverage: _outcomes.Coverage | None) -> asyncio.Future[Task]:
        """A future of task ``name``'s terminal state; see ``OutcomeWatcher.begin``."""
        await self.start()
        future: asyncio.Future[Task] = asyncio.get_running_loop().create_future()
        registration = self._board.register(name, future, coverage)
        if registration.task is not None:
            future.set_result(registration.task)
        elif registration.check:
            try:
                await self._check_one(name)
            except BaseException:  # cancelled (a timeout) before the caller got the future
                self._board.discard(name, future)
                raise
        return future

    def finish(self, name: str, future: asyncio.Future[Task]) -> None:
        """Stops waiting on ``future`` (it may still be pending)."""
        self._board.discard(name, future)

    async def close(self) -> None:
        """Ends the stream and fails every wait still pending."""
        self._closed = True
        await stop_reader(self._reader)
        _fail(self._board.drain(), TetherError(_CLOSED, code=grpc.StatusCode.CANCELLED))

    # -- the reader task

    async def _run(self) -> None:
        try:
            while not self._closed:
                delay = await self._read_once()
                if delay:
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused for good (or a bug): every waiter learns why
            _fail(self._board.drain(), error)

    async def _read_once(self) -> float:
        """Reads the stream until it breaks; returns the delay before the next attempt."""
        machine = self._machine
        assert machine is not None
        call = self._client._open_stream(machine)
        try:
            async for message in call:
                task = _outcomes.terminal_task(machine.on_message(message))
                if task is not None:
                    self._resolve(task, from_stream=True)
            action = machine.on_end()
        except grpc.aio.AioRpcError as exc:
            error = await _error(call, exc)
            if isinstance(error, ResumeTokenExpired):
                await self._restart()
                return 0.0
            action = machine.on_error(error)
        finally:
            call.cancel()
        return action.delay if isinstance(action, _watch.Reconnect) else 0.0

    async def _restart(self) -> None:
        """The token expired: start over from a fresh one and check every waiter."""
        backoff = _core.Backoff(self._client._config.retry)
        while True:
            try:
                token = await self._start_token()
                break
            except Unavailable:
                await asyncio.sleep(backoff.next_delay())
        self._machine = _outcomes.outcome_machine(self._client._config.retry, token)
        await self._check(self._board.restart())

    # -- plumbing

    async def _start_token(self) -> str:
        response = await self._client._list_page(_outcomes.start_token_request())
        return response.resume_token

    async def _check(self, names: list[str]) -> None:
        await asyncio.gather(*(self._check_one(name) for name in names))

    async def _check_one(self, name: str) -> None:
        """Asks the server whether ``name`` already ended; resolves its waiters if so.

        UNAVAILABLE is retried until the server answers, as ``OutcomeWatcher`` does.
        """
        backoff = _core.Backoff(self._client._config.retry)
        while True:
            try:
                task = await self._client.get(name)
                break
            except Unavailable:
                await asyncio.sleep(backoff.next_delay())
            except TetherError as error:
                _fail(self._board.take(name), error)
                return
        if task.state.is_terminal:
            self._resolve(task, from_stream=False)

    def _resolve(self, task: Task, *, from_stream: bool) -> None:
        for waiter in self._board.resolve(task, from_stream=from_stream):
            if not waiter.done():
                waiter.set_result(task)


def _fail(waiters: list[asyncio.Future[Task]], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)


async def map_results(
    watcher: AsyncOutcomeWatcher,
    submit: Callable[[Mapping[str, Any] | None], Awaitable[AsyncTaskHandle]],
    args: Iterable[Mapping[str, Any] | None],
    *,
    ordered: bool,
    max_in_flight: int,
    return_exceptions: bool,
) -> AsyncIterator[Any]:
    """What ``AsyncClient.map`` does; see ``Client.map``."""
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    await watcher.start()  # before the first submit, so that every task is covered
    pending = iter(args)
    exhausted = False
    in_flight: dict[str, asyncio.Future[Task]] = {}  # insertion order is submission order
    finished: asyncio.Queue[str] = asyncio.Queue()
    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight:
                try:
                    item = next(pending)
                except StopIteration:
                    exhausted = True
                    break
                handle = await submit(item)
                future = await watcher.begin(handle.name, handle._coverage)
                in_flight[handle.name] = future
                if not ordered:
                    future.add_done_callback(_announce(finished, handle.name))
            if not in_flight:
                return
            if ordered:
                name = next(iter(in_flight))
                await asyncio.wait([in_flight[name]])
            else:
                name = await finished.get()
            future = in_flight.pop(name)
            watcher.finish(name, future)
            yield _core.outcome(future.result(), return_exceptions=return_exceptions)
    finally:
        for name, future in in_flight.items():
            watcher.finish(name, future)


def _announce(names: asyncio.Queue[str], name: str) -> Callable[[asyncio.Future[Task]], None]:
    """A done-callback that puts ``name`` on ``names`` (``map(ordered=False)``)."""
    return lambda _: names.put_nowait(name)
