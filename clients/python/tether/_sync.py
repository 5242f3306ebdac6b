"""The blocking client: :class:`Client`, :class:`TaskHandle` and :class:`TaskWatch`.

A thin shell over ``_core`` and ``_watch``: it sends what they build, sleeps
the delays they choose and raises what they map. :mod:`tether._async` is its
twin for asyncio; both expose the same methods with the same parameters.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar, cast, overload

import grpc
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

__all__ = ["Client", "TaskHandle", "TaskWatch"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_Item = TypeVar("_Item")


class _ResponseStream(Protocol):
    """What a server-streaming call returns (grpc's own type is for type checkers only)."""

    def __next__(self) -> task_service_pb2.StreamTaskStatusResponse: ...

    def cancel(self) -> bool: ...


def _error(exc: grpc.RpcError) -> TetherError:
    """The typed exception for a failed call (``_core.error_from_status`` decides which)."""
    if not isinstance(exc, grpc.Call):
        return TetherError(str(exc) or "the call failed", code=grpc.StatusCode.UNKNOWN)
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # the rich status contradicts the call's code or message
        status = None
    return _core.error_from_status(exc.code(), exc.details(), status)


class Client:
    """A blocking connection to a tether server.

    Example::

        with tether.Client("127.0.0.1:50051") as client:
            handle = client.submit("demo.echo", args={"message": "hi"})
            print(handle.result())

    Args:
        address: ``host:port``; default ``$TETHER_ADDRESS``, else ``127.0.0.1:50051``.
        timeout: Deadline of each unary call, retries included (seconds or a
            timedelta; None: no deadline). Streams never have one.
        retry: When and how UNAVAILABLE is retried (see :class:`RetryPolicy`).
        credentials: TLS credentials; plaintext when None.
        token: A bearer token sent as ``authorization`` metadata on every call.
        metadata: Extra metadata sent on every call.
        channel: Use this channel instead of opening one (the client will not close it).
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
        channel: grpc.Channel | None = None,
    ) -> None:
        self._config = _core.client_config(address, timeout, retry, token, metadata)
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.insecure_channel(self._config.address, _core.CHANNEL_OPTIONS)
            else:
                channel = grpc.secure_channel(
                    self._config.address, credentials, _core.CHANNEL_OPTIONS
                )
        self._channel = channel
        self._tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        self._cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)

    @property
    def address(self) -> str:
        """The ``host:port`` this client talks to."""
        return self._config.address

    def close(self) -> None:
        """Closes the channel (unless it was passed in); open watches end."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- tasks

    def submit(
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
    ) -> TaskHandle:
        """Queues a run of the registered task ``task`` and returns its handle at once.

        Args:
            task: The registered task, e.g. ``"demo.sleep"``.
            args: JSON-shaped keyword arguments of the task.
            labels: Labels to attach (filterable in ``list`` and ``watch``).
            priority: Higher runs first; equal priorities run in submission order.
            timeout: Run-time limit from start to end; past it the task ends TIMED_OUT.
            grace: Time SIGINT gets before SIGTERM, or every stage's via GracePeriods.
            request_id: Idempotency key; a UUID4 is made when None. Retries of this
                call reuse it, so the task is created once.
            resume_from: A task (name or id) whose last checkpoint this run resumes from.
            required_tags: Engine tags the task needs (e.g. ``"gpu"``).
            queue_timeout: Time the task may wait in the queue before it ends FAILED.

        Raises:
            InvalidArgument: A field was refused; ``violations`` says which.
            RequestIdReused: ``request_id`` was used before for another payload.
        """
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
        response = self._unary(self._tasks.SubmitTask, request)
        return TaskHandle(
            self,
            response.task.name,
            submitted=_convert.task_from_proto(response.task),
            deduplicated=response.deduplicated,
        )

    def get_handle(self, name_or_id: str) -> TaskHandle:
        """A handle for an existing task (no call is made)."""
        return TaskHandle(self, _core.task_name(name_or_id))

    def get(self, name_or_id: str, *, view: TaskView = TaskView.FULL) -> Task:
        """The task named ``"tasks/ID"`` or ``"ID"``; raises TaskNotFound."""
        response = self._unary(self._tasks.GetTask, _core.get_request(name_or_id, view))
        return _convert.task_from_proto(response.task)

    def list(
        self,
        filter: TaskFilter | None = None,
        *,
        page_size: int | None = None,
        view: TaskView | None = None,
    ) -> Iterator[Task]:
        """Tasks matching ``filter``, oldest first, fetched a page at a time as iteration goes."""
        request = _core.list_request(filter, page_size, view)
        while True:
            response = self._unary(self._tasks.ListTasks, request)
            for message in response.tasks:
                yield _convert.task_from_proto(message)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def interrupt(
        self,
        name_or_id: str,
        *,
        reason: str = "",
        grace: Seconds | GracePeriods | None = None,
        request_id: str | None = None,
    ) -> Task:
        """Stops a task and returns it as it is right after the request.

        A PENDING task ends CANCELLED at once; a RUNNING one comes back INTERRUPTING
        and reaches its terminal state later (watch it, or ``TaskHandle.result``).
        Interrupting an INTERRUPTING or already interrupted task does nothing.

        Raises:
            TaskNotFound: No such task.
            TaskAlreadyTerminal: The task already SUCCEEDED, FAILED or TIMED_OUT.
        """
        request = _core.interrupt_request(
            name_or_id, reason=reason, grace=grace, request_id=request_id
        )
        response = self._unary(self._tasks.InterruptTask, request)
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
    ) -> TaskWatch[TaskEvent]: ...

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
    ) -> TaskWatch[TaskEvent | Checkpoint]: ...

    def watch(
        self,
        filter: TaskFilter | None = None,
        *,
        resume_token: str | None = None,
        send_initial_state: bool = False,
        exclude_progress: bool = False,
        view: TaskView | None = None,
        checkpoints: bool = False,
    ) -> TaskWatch[TaskEvent] | TaskWatch[TaskEvent | Checkpoint]:
        """Every change to the tasks matching ``filter``, live, for as long as you iterate.

        The iterator survives server restarts and network failures: it resumes from
        the last token it received, with a capped exponential backoff, and yields each
        event once, in revision order. When its token has expired (the server no
        longer holds that part of its log) it re-lists the matching tasks, yields a
        SNAPSHOT event for each task that changed since, and continues live. See
        ``tether._watch.WatchMachine`` for the exact guarantees.

        Args:
            filter: Which tasks; all when None.
            resume_token: Continue strictly after the event or checkpoint that carried it.
            send_initial_state: Start with a SNAPSHOT event per matching task.
            exclude_progress: Leave out PROGRESS and OUTPUT events.
            view: How much of each task to receive (default BASIC: no result).
            checkpoints: Also yield :class:`Checkpoint` items (idle-stream positions).
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
            return TaskWatch[TaskEvent | Checkpoint](self, machine)
        return TaskWatch[TaskEvent](self, machine)

    # -- cluster

    def cluster(self) -> Cluster:
        """The engines of the cluster, their state and current task, and the server's limits."""
        response = self._unary(self._cluster.GetCluster, cluster_service_pb2.GetClusterRequest())
        return _convert.cluster_from_proto(response)

    # -- plumbing shared with TaskHandle and TaskWatch

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
    ) -> _Response:
        """One unary call with the client's deadline, retried on UNAVAILABLE."""
        attempts = _core.UnaryAttempts(self._config)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self._config.metadata)
            except grpc.RpcError as exc:
                error = _error(exc)
                delay = attempts.retry_delay(error)
                if delay is None:
                    raise error from exc
            time.sleep(delay)

    def _open_stream(self, machine: _watch.WatchMachine) -> _ResponseStream:
        return self._tasks.StreamTaskStatus(
            machine.stream_request(),
            timeout=machine.stream_timeout(),
            metadata=self._config.metadata,
        )

    def _list_page(
        self, request: task_service_pb2.ListTasksRequest
    ) -> task_service_pb2.ListTasksResponse:
        return self._unary(self._tasks.ListTasks, request)


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
        self._call: _ResponseStream | None = None
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
        while isinstance(action, _watch.Relist):
            time.sleep(action.delay)
            try:
                self._relist()
            except TetherError as error:
                self._machine.abandon_relist()
                action = self._machine.on_relist_error(error)
            else:
                action = self._machine.finish_relist()
        if isinstance(action, _watch.Reconnect):
            time.sleep(action.delay)

    def _relist(self) -> None:
        page_token = ""
        while True:
            response = self._client._list_page(self._machine.list_request(page_token))
            self._pending.extend(self._machine.on_list_page(response))
            page_token = response.next_page_token
            if not page_token:
                return

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


class TaskHandle(_watch.TaskHandleBase):
    """One submitted task: wait for it, watch it, stop it.

    Made by ``Client.submit`` (``submitted`` is the task as accepted) or
    ``Client.get_handle`` (``submitted`` is None). ``name`` and ``id`` identify it.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        submitted: Task | None = None,
        deduplicated: bool = False,
    ) -> None:
        super().__init__(name, submitted=submitted, deduplicated=deduplicated)
        self._client = client

    def refresh(self) -> Task:
        """The task as it is now (FULL view)."""
        return self._client.get(self.name)

    def interrupt(
        self,
        reason: str = "",
        *,
        grace: Seconds | GracePeriods | None = None,
        request_id: str | None = None,
    ) -> Task:
        """Stops the task (see ``Client.interrupt``); returns it right after the request."""
        return self._client.interrupt(self.name, reason=reason, grace=grace, request_id=request_id)

    def watch(self, *, exclude_progress: bool = False) -> TaskWatch[TaskEvent]:
        """The task's events: a SNAPSHOT of its current state, then every change.

        Ends after the terminal event; resumes across failures like ``Client.watch``.
        """
        machine = self._watch_machine(self._client._config.retry, exclude_progress, None)
        return TaskWatch[TaskEvent](self._client, machine)

    def result(self, timeout: Seconds | None = None) -> Any:
        """Waits for the task to end and returns its JSON-decoded result.

        Waits on the task's event stream (resuming across server restarts), then
        fetches the final task in the FULL view.

        Raises:
            TaskFailed, TaskInterrupted, TaskTimedOut, TaskCancelled: The task ended
                without succeeding; ``.task`` holds it, error and interrupt record included.
            DeadlineExceeded: ``timeout`` passed first (the task goes on running).
        """
        machine = self._watch_machine(self._client._config.retry, True, timeout)
        with TaskWatch[TaskEvent](self._client, machine) as events:
            for _ in events:
                pass
        return _core.task_result(self.refresh())
