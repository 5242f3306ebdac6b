"""The asyncio client's resumable watch: :class:`AsyncTaskWatch`.

The twin of ``_sync_watch``: an async iterator that carries out what
``_watch.WatchMachine`` decides; ``AsyncClient.watch`` and
``AsyncTaskHandle.watch`` return one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Self, TypeAlias, TypeVar, cast

import grpc
import grpc.aio
from grpc_status import rpc_status

from tether import _core, _watch
from tether._exceptions import TetherError
from tether._models import TaskEvent
from tether.v1 import task_service_pb2

if TYPE_CHECKING:
    from tether._async import AsyncClient

__all__ = ["AsyncTaskWatch", "StreamCall", "carry_out", "stop_reader"]

_Item = TypeVar("_Item")

StreamCall: TypeAlias = grpc.aio.UnaryStreamCall[
    task_service_pb2.StreamTaskStatusRequest, task_service_pb2.StreamTaskStatusResponse
]
"""A ``StreamTaskStatus`` call of the asyncio client."""


async def _error(call: grpc.aio.Call, exc: grpc.aio.AioRpcError) -> TetherError:
    """The typed exception for a failed call (``_core.error_from_status`` decides which)."""
    try:
        status = await rpc_status.aio.from_call(call)
    except ValueError:  # the rich status contradicts the call's code or message
        status = None
    return _core.error_from_status(exc.code(), exc.details(), status)


async def stop_reader(reader: asyncio.Task[None] | None) -> None:
    """Cancels a background reader task (a shared stream's) and waits until it is gone."""
    if reader is not None and not reader.done():
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def carry_out(
    client: AsyncClient,
    machine: _watch.WatchMachine,
    action: _watch.WatchAction,
    sink: Callable[[list[TaskEvent]], object],
) -> None:
    """Does what ``machine`` decided after a stream ended; see ``_sync_watch.carry_out``."""
    while isinstance(action, _watch.Relist):
        await asyncio.sleep(action.delay)
        try:
            page_token = ""
            while True:
                response = await client._list_page(machine.list_request(page_token))
                sink(machine.on_list_page(response))
                page_token = response.next_page_token
                if not page_token:
                    break
        except TetherError as error:
            machine.abandon_relist()
            action = machine.on_relist_error(error)
        else:
            action = machine.finish_relist()
    if isinstance(action, _watch.Reconnect):
        await asyncio.sleep(action.delay)


class AsyncTaskWatch(Generic[_Item]):
    """An async iterator over task events that resumes across failures.

    Use it as an async context manager, or call ``aclose``, to end the stream
    early; ``resume_token`` is the position reached so far.
    """

    def __init__(self, client: AsyncClient, machine: _watch.WatchMachine) -> None:
        self._client = client
        self._machine = machine
        self._call: StreamCall | None = None
        self._messages: AsyncIterator[task_service_pb2.StreamTaskStatusResponse] | None = None
        self._pending: deque[TaskEvent] = deque()
        self._closed = False

    @property
    def resume_token(self) -> str:
        """Token of the last message received; resuming from it loses and repeats nothing."""
        return self._machine.resume_token

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> _Item:
        while True:
            if self._pending:
                return cast(_Item, self._pending.popleft())
            if self._closed or self._machine.finished:
                await self.aclose()
                raise StopAsyncIteration
            if self._call is None or self._messages is None:
                self._call = self._client._open_stream(self._machine)
                self._messages = self._call.__aiter__()
            call = self._call
            try:
                message = await anext(self._messages)
            except StopAsyncIteration:
                self._drop_call()
                await self._act(self._machine.on_end())
                continue
            except grpc.aio.AioRpcError as exc:
                self._drop_call()
                if not self._closed:  # else aclose() from another task cancelled the call
                    await self._act(self._machine.on_error(await _error(call, exc)))
                continue
            item = self._machine.on_message(message)
            if item is not None:
                return cast(_Item, item)

    def _drop_call(self) -> None:
        self._call = None
        self._messages = None

    async def _act(self, action: _watch.WatchAction) -> None:
        await carry_out(self._client, self._machine, action, self._pending.extend)

    async def aclose(self) -> None:
        """Ends the stream; iteration stops."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._drop_call()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
