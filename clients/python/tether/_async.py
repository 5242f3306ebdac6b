"""The asyncio client: :class:`AsyncClient`, :class:`AsyncTaskHandle`, :class:`AsyncTaskWatch`.

The twin of :mod:`tether._sync` over ``grpc.aio``: the same methods with the
same parameters, awaited. Both carry out what ``_core`` and ``_watch`` decide.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, cast, overload

import grpc
import grpc.aio
from grpc_status import rpc_status

from tether import _convert, _core, _watch
from tether._convert import Seconds
from tether._core import RetryPolicy
from tether._exceptions import TetherError
from tether._models import Checkpoint, Cluster, GracePeriods, Task, TaskEvent, TaskFilter, TaskView
from tether.v1 import (
    cluster_service_pb2,
    cluster_service_pb2_grpc,
    task_service_pb2,
    task_service_pb2_grpc,
)

__all__ = ["AsyncClient", "AsyncTaskHandle", "AsyncTaskWatch"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")


async def _error(call: grpc.aio.Call, exc: grpc.aio.AioRpcError) -> TetherError:
    """The typed exception for a failed call (``_core.error_from_status`` decides which)."""
    try:
        status = await rpc_status.aio.from_call(call)
    except ValueError:  # the rich status contradicts the call's code or message
        status = None
    return _core.error_from_status(exc.code(), exc.details(), status)


class AsyncClient:
    """An asyncio connection to a tether server; the twin of :class:`tether.Client`.

    Example::

        async with tether.AsyncClient("127.0.0.1:50051") as client:
            handle = await client.submit("demo.echo", args={"message": "hi"})
            print(await handle.result())

    Takes the same arguments as :class:`tether.Client`; ``channel`` is a
    ``grpc.aio.Channel`` here.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: Seconds | None = _core.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Mapping[str, str] | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._config = _core.client_config(address, timeout, retry, token, metadata)
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(self._config.address, _core.CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    self._config.address, credentials, _core.CHANNEL_OPTIONS
                )
        self._channel = channel
        self._tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        self._cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)

    @property
    def address(self) -> str:
        """The ``host:port`` this client talks to."""
        return self._config.address

    async def close(self) -> None:
        """Closes the channel (unless it was passed in); open watches end."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tasks

    async def submit(
        self,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        timeout: Seconds | None = None,
        grace: Seconds | GracePeriods | None = None,
        request_id: str | None = None,
        resume_from: str | None = None,
        required_tags: Sequence[str] | None = None,
        queue_timeout: Seconds | None = None,
    ) -> AsyncTaskHandle:
        """Queues a run of the registered task ``task``; see ``Client.submit``."""
        request = _core.submit_request(
            task,
            args=args,
            labels=labels,
            priority=priority,
            timeout=timeout,
            grace=grace,
            request_id=request_id,
            resume_from=resume_from,
            required_tags=required_tags,
            queue_timeout=queue_timeout,
        )
        response = await self._unary(self._tasks.SubmitTask, request)
        return AsyncTaskHandle(
            self,
            response.task.name,
            submitted=_convert.task_from_proto(response.task),
            deduplicated=response.deduplicated,
        )

    def get_handle(self, name_or_id: str) -> AsyncTaskHandle:
        """A handle for an existing task (no call is made)."""
        return AsyncTaskHandle(self, _core.task_name(name_or_id))

    async def get(self, name_or_id: str, *, view: TaskView = TaskView.FULL) -> Task:
        """The task named ``"tasks/ID"`` or ``"ID"``; raises TaskNotFound."""
        response = await self._unary(self._tasks.GetTask, _core.get_request(name_or_id, view))
        return _convert.task_from_proto(response.task)

    async def list(
        self,
        filter: TaskFilter | None = None,
        *,
        page_size: int | None = None,
        view: TaskView | None = None,
    ) -> AsyncIterator[Task]:
        """Tasks matching ``filter``, oldest first, fetched a page at a time (``async for``)."""
        request = _core.list_request(filter, page_size, view)
        while True:
            response = await self._unary(self._tasks.ListTasks, request)
            for message in response.tasks:
                yield _convert.task_from_proto(message)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def interrupt(
        self,
        name_or_id: str,
        *,
        reason: str = "",
        grace: Seconds | GracePeriods | None = None,
        request_id: str | None = None,
    ) -> Task:
        """Stops a task; see ``Client.interrupt``."""
        request = _core.interrupt_request(
            name_or_id, reason=reason, grace=grace, request_id=request_id
        )
        response = await self._unary(self._tasks.InterruptTask, request)
        return _convert.task_from_proto(response.task)

    @overload
    def watch(
        self,
        filter: TaskFilter | None = None,
        *,
        resume_token: str | None = None,
        send_initial_state: bool = False,
        exclude_progress: bool = False,
        view: TaskView | None = None,
        checkpoints: Literal[False] = False,
    ) -> AsyncTaskWatch[TaskEvent]: ...

    @overload
    def watch(
        self,
        filter: TaskFilter | None = None,
        *,
        resume_token: str | None = None,
        send_initial_state: bool = False,
        exclude_progress: bool = False,
        view: TaskView | None = None,
        checkpoints: Literal[True],
    ) -> AsyncTaskWatch[TaskEvent | Checkpoint]: ...

    def watch(
        self,
        filter: TaskFilter | None = None,
        *,
        resume_token: str | None = None,
        send_initial_state: bool = False,
        exclude_progress: bool = False,
        view: TaskView | None = None,
        checkpoints: bool = False,
    ) -> AsyncTaskWatch[TaskEvent] | AsyncTaskWatch[TaskEvent | Checkpoint]:
        """Every change to the matching tasks, resuming across failures; see ``Client.watch``.

        Not a coroutine: iterate the result with ``async for``.
        """
        machine = _watch.WatchMachine(
            policy=self._config.retry,
            task_filter=filter,
            resume_token=resume_token,
            send_initial_state=send_initial_state,
            view=view,
            exclude_progress=exclude_progress,
            yield_checkpoints=checkpoints,
        )
        if checkpoints:
            return AsyncTaskWatch[TaskEvent | Checkpoint](self, machine)
        return AsyncTaskWatch[TaskEvent](self, machine)

    # -- cluster

    async def cluster(self) -> Cluster:
        """The engines of the cluster, their state and current task, and the server's limits."""
        response = await self._unary(
            self._cluster.GetCluster, cluster_service_pb2.GetClusterRequest()
        )
        return _convert.cluster_from_proto(response)

    # -- plumbing shared with AsyncTaskHandle and AsyncTaskWatch

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
    ) -> _Response:
        """One unary call with the client's deadline, retried on UNAVAILABLE."""
        attempts = _core.UnaryAttempts(self._config)
        while True:
            call = method(request, timeout=attempts.timeout(), metadata=self._config.metadata)
            try:
                return await call
            except grpc.aio.AioRpcError as exc:
                error = await _error(call, exc)
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise error from exc
            await asyncio.sleep(delay)

    def _open_stream(
        self, machine: _watch.WatchMachine
    ) -> grpc.aio.UnaryStreamCall[
        task_service_pb2.StreamTaskStatusRequest, task_service_pb2.StreamTaskStatusResponse
    ]:
        return self._tasks.StreamTaskStatus(
            machine.stream_request(),
            timeout=machine.stream_timeout(),
            metadata=self._config.metadata,
        )

    async def _list_page(
        self, request: task_service_pb2.ListTasksRequest
    ) -> task_service_pb2.ListTasksResponse:
        return await self._unary(self._tasks.ListTasks, request)


class AsyncTaskWatch(Generic[_Item]):
    """An async iterator over task events that resumes across failures.

    Use it as an async context manager, or call ``aclose``, to end the stream
    early; ``resume_token`` is the position reached so far.
    """

    def __init__(self, client: AsyncClient, machine: _watch.WatchMachine) -> None:
        self._client = client
        self._machine = machine
        self._call: (
            grpc.aio.UnaryStreamCall[
                task_service_pb2.StreamTaskStatusRequest,
                task_service_pb2.StreamTaskStatusResponse,
            ]
            | None
        ) = None
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
        while isinstance(action, _watch.Relist):
            await asyncio.sleep(action.delay)
            try:
                await self._relist()
            except TetherError as error:
                self._machine.abandon_relist()
                action = self._machine.on_relist_error(error)
            else:
                action = self._machine.finish_relist()
        if isinstance(action, _watch.Reconnect):
            await asyncio.sleep(action.delay)

    async def _relist(self) -> None:
        page_token = ""
        while True:
            response = await self._client._list_page(self._machine.list_request(page_token))
            self._pending.extend(self._machine.on_list_page(response))
            page_token = response.next_page_token
            if not page_token:
                return

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


class AsyncTaskHandle(_watch.TaskHandleBase):
    """One submitted task, for asyncio; the twin of :class:`tether.TaskHandle`."""

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        submitted: Task | None = None,
        deduplicated: bool = False,
    ) -> None:
        super().__init__(name, submitted=submitted, deduplicated=deduplicated)
        self._client = client

    async def refresh(self) -> Task:
        """The task as it is now (FULL view)."""
        return await self._client.get(self.name)

    async def interrupt(
        self,
        reason: str = "",
        *,
        grace: Seconds | GracePeriods | None = None,
        request_id: str | None = None,
    ) -> Task:
        """Stops the task (see ``Client.interrupt``); returns it right after the request."""
        return await self._client.interrupt(
            self.name, reason=reason, grace=grace, request_id=request_id
        )

    def watch(self, *, exclude_progress: bool = False) -> AsyncTaskWatch[TaskEvent]:
        """The task's events, from a SNAPSHOT of its current state to its terminal event."""
        machine = self._watch_machine(self._client._config.retry, exclude_progress, None)
        return AsyncTaskWatch[TaskEvent](self._client, machine)

    async def result(self, timeout: Seconds | None = None) -> Any:
        """Waits for the task to end and returns its result; see ``TaskHandle.result``."""
        machine = self._watch_machine(self._client._config.retry, True, timeout)
        async with AsyncTaskWatch[TaskEvent](self._client, machine) as events:
            async for _ in events:
                pass
        return _core.task_result(await self.refresh())
