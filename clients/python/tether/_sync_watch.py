"""The blocking client's resumable watch: :class:`TaskWatch`.

An iterator that carries out what ``_watch.WatchMachine`` decides, with blocking
calls: ``Client.watch`` and ``TaskHandle.watch`` return one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, Self, TypeVar, cast

import grpc

from tether import _core, _watch
from tether._exceptions import TetherError
from tether._models import TaskEvent
from tether.v1 import task_service_pb2

if TYPE_CHECKING:
    from tether._sync import Client

__all__ = ["ResponseStream", "TaskWatch", "carry_out"]

_Item = TypeVar("_Item")
_error = _core.error_from_rpc


class ResponseStream(Protocol):
    """What a server-streaming call returns (grpc's own type is for type checkers only)."""

    def __iter__(self) -> Iterator[task_service_pb2.StreamTaskStatusResponse]: ...

    def __next__(self) -> task_service_pb2.StreamTaskStatusResponse: ...

    def cancel(self) -> bool: ...


def carry_out(
    client: Client,
    machine: _watch.WatchMachine,
    action: _watch.WatchAction,
    sink: Callable[[list[TaskEvent]], object],
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """Does what ``machine`` decided after a stream ended: re-list, then wait to reconnect.

    A re-list hands each page's SNAPSHOT events to ``sink``; ``Finished`` does nothing.
    """
    while isinstance(action, _watch.Relist):
        sleep(action.delay)
        try:
            page_token = ""
            while True:
                response = client._list_page(machine.list_request(page_token))
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
        sleep(action.delay)


class TaskWatch(Generic[_Item]):
    """An iterator over task events that resumes across failures (see ``Client.watch``).

    Use it as a context manager, or call ``close``, to end the stream early::

        with client.watch(TaskFilter(states=[TaskState.RUNNING])) as events:
            for event in events:
                ...

    ``resume_token`` is the position reached so far: store it to continue later.
    """

    def __init__(self, client: Client, machine: _watch.WatchMachine) -> None:
        self._client = client
        self._machine = machine
        self._call: ResponseStream | None = None
        self._pending: deque[TaskEvent] = deque()
        self._closed = False

    @property
    def resume_token(self) -> str:
        """Token of the last message received; resuming from it loses and repeats nothing."""
        return self._machine.resume_token

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> _Item:
        while True:
            if self._pending:
                return cast(_Item, self._pending.popleft())
            if self._closed or self._machine.finished:
                self.close()
                raise StopIteration
            if self._call is None:
                self._call = self._client._open_stream(self._machine)
            try:
                message = next(self._call)
            except StopIteration:
                self._call = None
                self._act(self._machine.on_end())
                continue
            except grpc.RpcError as exc:
                self._call = None
                if not self._closed:  # else close() from another thread cancelled the call
                    self._act(self._machine.on_error(_error(exc)))
                continue
            item = self._machine.on_message(message)
            if item is not None:
                return cast(_Item, item)

    def _act(self, action: _watch.WatchAction) -> None:
        carry_out(self._client, self._machine, action, self._pending.extend)

    def close(self) -> None:
        """Ends the stream; iteration stops."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
