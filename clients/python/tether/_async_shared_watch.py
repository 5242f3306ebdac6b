"""The asyncio client's shared watch stream: :class:`AsyncSharedWatcher`, :class:`AsyncHandleWatch`.

The twin of ``_sync_shared_watch``: one background asyncio task reads the
client's shared watch stream and queues each event for the watches of its task,
as ``_shared_watch.SharedWatchBoard`` decides; ``AsyncHandleWatch`` (what
``AsyncTaskHandle.watch`` returns) awaits its route's queue. The reader starts
with the first watch, in the loop of that watch, and ends with ``AsyncClient.close``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from tether import _core, _shared_watch, _watch
from tether._async_watch import AsyncTaskWatch, StreamCall, _error, carry_out, stop_reader
from tether._exceptions import TetherError, Unavailable
from tether._models import Task, TaskEvent
from tether._shared_watch import HandleWatchPlace, Join, Route, RouteState, SharedWatchBoard
from tether.v1.task_service_pb2 import ListTasksResponse

if TYPE_CHECKING:
    from tether._async import AsyncClient

__all__ = ["AsyncHandleWatch", "AsyncSharedWatcher"]

_Route = Route[asyncio.Event]


class AsyncSharedWatcher:
    """One stream of names shared by every ``AsyncTaskHandle.watch`` of an ``AsyncClient``.

    Single-threaded like asyncio itself: the board is touched only between awaits.
    See ``tether._shared_watch`` for the guarantees.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._board: SharedWatchBoard[asyncio.Event] = SharedWatchBoard()
        self._changed = asyncio.Event()
        """Set when the board changed; the reader waits on it while no route is on the board."""
        self._machine: _watch.WatchMachine | None = None
        self._call: StreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, name: str, *, exclude_progress: bool) -> _Route:
        """A new watch of task ``name``: it joins the stream, or starts DETACHED."""
        if self._closed:
            raise _shared_watch.closed_error()
        route = self._board.add(name, asyncio.Event(), exclude_progress=exclude_progress)
        if route.state is RouteState.DETACHED:
            return route
        self._reopen()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._run())
        return route

    async def next_item(self, route: _Route) -> TaskEvent | RouteState:
        """Waits for ``route``'s next event, or the state it ended in (see ``settle``)."""
        while not route.items and route.on_board:
            route.signal.clear()
            await route.signal.wait()
        if route.items:
            return route.items.popleft()
        return _shared_watch.settle(route)

    def remove(self, route: _Route) -> None:
        """The consumer closed its watch: ``route`` leaves (a waiting consumer stops)."""
        self._board.remove(route)
        self._reopen()
        route.signal.set()

    async def close(self) -> None:
        """Ends the stream; every watch on it raises TetherError (CANCELLED)."""
        self._closed = True
        await stop_reader(self._reader)
        self._wake(self._board.fail_all(_shared_watch.closed_error()))

    # -- the reader task

    async def _run(self) -> None:
        backoff = _core.Backoff(self._client._config.retry)
        try:
            while not self._closed:
                if self._board.empty:
                    self._machine = None  # the next stream starts from a fresh listing
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                try:
                    await self._join(self._board.joining())
                except Unavailable:
                    self._board.changed = True  # the joining routes are still to list
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                shape = None if self._board.changed else self._board.shape()
                if shape is not None and self._machine is not None:
                    self._machine.retarget(
                        shape.task_filter, exclude_progress=shape.exclude_progress
                    )
                    await self._read(self._machine)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # refused for good (or a bug): every watch learns why
            self._machine = None
            self._wake(self._board.fail_all(error))

    async def _join(self, routes: list[_Route]) -> None:
        """Lists the joining ``routes`` and queues their snapshots (``Join`` decides)."""
        machine = self._machine
        join = Join(self._board, routes, machine.resume_token if machine else None)
        while (call := join.next_call()) is not None:
            try:
                if isinstance(call, str):
                    answer: Task | ListTasksResponse = await self._client.get(
                        call, view=_shared_watch.SNAPSHOT_VIEW
                    )
                else:
                    answer = await self._client._list_page(call)
            except Unavailable:
                raise
            except TetherError as error:
                self._wake(join.on_error(error))
            else:
                self._wake(join.on_answer(answer))
        if machine is None and join.resume_token is not None:
            self._machine = _shared_watch.shared_machine(
                self._client._config.retry, join.resume_token
            )

    async def _read(self, machine: _watch.WatchMachine) -> None:
        """Reads the stream until it breaks or no longer fits the board, then does what
        the machine decides (re-list, wait before reconnecting)."""
        call = self._client._open_stream(machine)
        self._call = call
        try:
            async for message in call:
                item = machine.on_message(message)
                if isinstance(item, TaskEvent):
                    self._wake(self._board.on_event(item))
                if self._done():
                    call.cancel()
            action = machine.on_end()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed or (task is not None and task.cancelling()):
                raise
            return  # the call was cancelled by _done() or _reopen()
        except grpc.aio.AioRpcError as exc:
            if self._done() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            action = machine.on_error(await _error(call, exc))
        finally:
            self._call = None
            call.cancel()
        await carry_out(self._client, machine, action, self._route_events)

    # -- plumbing

    def _done(self) -> bool:
        """The open stream must go (closing, reopening, or no watch left)."""
        return self._closed or self._board.changed or self._board.empty

    def _route_events(self, events: list[TaskEvent]) -> None:
        for event in events:
            self._wake(self._board.on_event(event))

    def _reopen(self) -> None:
        """If the board changed, the reader reopens the stream."""
        if self._board.changed:
            if self._call is not None:
                self._call.cancel()
            self._changed.set()

    def _wake(self, routes: list[_Route]) -> None:
        for route in routes:
            route.signal.set()


class AsyncHandleWatch(AsyncTaskWatch[TaskEvent]):
    """What ``AsyncTaskHandle.watch`` returns; the twin of ``_sync_shared_watch.HandleWatch``."""

    def __init__(
        self,
        client: AsyncClient,
        machine: _watch.WatchMachine,
        *,
        name: str,
        exclude_progress: bool,
    ) -> None:
        super().__init__(client, machine)
        self._name = name
        self._exclude_progress = exclude_progress
        self._place: HandleWatchPlace[asyncio.Event] = HandleWatchPlace(machine)

    @property
    def resume_token(self) -> str:
        """Token of the last event yielded (from the shared stream) or received."""
        return self._place.resume_token

    async def __anext__(self) -> TaskEvent:
        place, watches = self._place, self._client._watches
        if not place.own_stream:
            if self._closed:
                raise StopAsyncIteration
            if place.route is None:
                place.joined(self, watches.add(self._name, exclude_progress=self._exclude_progress))
            assert place.route is not None
            event = place.take(await watches.next_item(place.route))
            if event is not None:
                return event
            if not place.own_stream:
                await self.aclose()
                raise StopAsyncIteration
        return await super().__anext__()

    async def aclose(self) -> None:
        """Ends the watch; iteration stops."""
        place = self._place
        if place.route is not None and not place.own_stream:
            self._client._watches.remove(place.route)
        await super().aclose()
