"""The asyncio client: :class:`AsyncClient`, :class:`AsyncTaskHandle`, :class:`AsyncTaskWatch`.

The twin of :mod:`tether._sync` over ``grpc.aio``: the same methods with the
same parameters, awaited. Both carry out what ``_core`` and ``_watch`` decide;
the watch iterator is in ``_async_watch``, the shared outcome stream in
``_async_outcomes``, the handles' shared watch stream in ``_async_shared_watch``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import grpc
import grpc.aio

from tether import _convert, _core, _outcomes, _watch
from tether._async_outcomes import AsyncOutcomeWatcher, map_results
from tether._async_shared_watch import AsyncHandleWatch, AsyncSharedWatcher
from tether._async_watch import AsyncTaskWatch, StreamCall, _error
from tether._convert import Seconds
from tether._core import RetryPolicy
from tether._models import (
    Checkpoint,
    Cluster,
    GracePeriods,
    Task,
    TaskEvent,
    TaskFilter,
    TaskRetryPolicy,
    TaskView,
)
from tether.v1 import (
    cluster_service_pb2,
    cluster_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)

__all__ = ["AsyncClient", "AsyncTaskHandle", "AsyncTaskWatch"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


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
        self._outcomes = AsyncOutcomeWatcher(self)
        self._watches = AsyncSharedWatcher(self)

    @property
    def address(self) -> str:
        """The ``host:port`` this client talks to."""
        return self._config.address

    async def close(self) -> None:
        """Closes the channel (unless it was passed in); open watches end.

        Waits still pending (``result``, ``map``) and handle watches raise
        TetherError (CANCELLED).
        """
        await self._watches.close()
        await self._outcomes.close()
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
        retry: TaskRetryPolicy | None = None,
        preemptible: bool | None = None,
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
            retry=retry,
            preemptible=preemptible,
        )
        coverage = self._outcomes.mark()
        response = await self._unary(self._tasks.SubmitTask, request)
        return AsyncTaskHandle(
            self,
            response.task.name,
            submitted=response.task,
            deduplicated=response.deduplicated,
            coverage=coverage,
        )

    def map(
        self,
        task: str,
        args: Iterable[Mapping[str, Any] | None],
        *,
        ordered: bool = True,
        max_in_flight: int = 64,
        return_exceptions: bool = False,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        timeout: Seconds | None = None,
        required_tags: Sequence[str] | None = None,
    ) -> AsyncIterator[Any]:
        """Runs ``task`` once per item of ``args``, yielding results; see ``Client.map``.

        Not a coroutine: iterate the result with ``async for``::

            async for square in client.map("demo.square", ({"x": x} for x in range(9))):
                ...
        """

        async def submit(item: Mapping[str, Any] | None) -> AsyncTaskHandle:
            return await self.submit(
                task,
                item,
                labels=labels,
                priority=priority,
                timeout=timeout,
                required_tags=required_tags,
            )

        return map_results(
            self._outcomes,
            submit,
            args,
            ordered=ordered,
            max_in_flight=max_in_flight,
            return_exceptions=return_exceptions,
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

    def _open_stream(self, machine: _watch.WatchMachine) -> StreamCall:
        return self._tasks.StreamTaskStatus(
            machine.stream_request(),
            timeout=machine.stream_timeout(),
            metadata=self._config.metadata,
        )

    async def _list_page(
        self, request: task_service_pb2.ListTasksRequest
    ) -> task_service_pb2.ListTasksResponse:
        return await self._unary(self._tasks.ListTasks, request)


class AsyncTaskHandle(_watch.TaskHandleBase):
    """One submitted task, for asyncio; the twin of :class:`tether.TaskHandle`."""

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        submitted: Task | task_pb2.Task | None = None,
        deduplicated: bool = False,
        coverage: _outcomes.Coverage | None = None,
    ) -> None:
        super().__init__(name, submitted=submitted, deduplicated=deduplicated)
        self._client = client
        self._coverage = coverage

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
        """The task's events, from a SNAPSHOT of its current state to its terminal event.

        Every handle watch of a client shares one server stream; see ``TaskHandle.watch``.
        """
        machine = self._watch_machine(self._client._config.retry, exclude_progress, None)
        return AsyncHandleWatch(
            self._client, machine, name=self.name, exclude_progress=exclude_progress
        )

    async def result(self, timeout: Seconds | None = None) -> Any:
        """Waits for the task to end and returns its result; see ``TaskHandle.result``."""
        return _core.task_result(await self._final_task(timeout))

    async def _final_task(self, timeout: Seconds | None) -> Task:
        outcomes = self._client._outcomes
        if not outcomes.running or self._known_terminal():
            task = await self.refresh()
            if task.state.is_terminal:
                return task
        seconds = _core.wait_seconds(timeout)
        future: asyncio.Future[Task] | None = None
        try:
            async with asyncio.timeout(seconds):
                future = await outcomes.begin(self.name, self._coverage)
                return await asyncio.shield(future)
        except TimeoutError:
            raise _core.wait_ran_out() from None
        finally:
            if future is not None:
                outcomes.finish(self.name, future)
