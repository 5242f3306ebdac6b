"""The blocking client: :class:`Client`, :class:`TaskHandle` and :class:`TaskWatch`.

A thin shell over ``_core`` and ``_watch``: it sends what they build, sleeps
the delays they choose and raises what they map. The watch iterator lives in
``_sync_watch``, the one stream that every ``result`` and ``map`` shares in
``_sync_outcomes``, the one that every handle's ``watch`` shares in
``_sync_shared_watch``. :mod:`tether._async` is its twin for asyncio; both expose
the same methods with the same parameters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import grpc

from tether import _convert, _core, _outcomes, _watch
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
from tether._sync_outcomes import OutcomeWatcher, map_results
from tether._sync_shared_watch import HandleWatch, SharedWatcher
from tether._sync_watch import ResponseStream, TaskWatch
from tether.v1 import (
    cluster_service_pb2,
    cluster_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
)

__all__ = ["Client", "TaskHandle", "TaskWatch"]

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


_error = _core.error_from_rpc


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
        self._outcomes = OutcomeWatcher(self)
        self._watches = SharedWatcher(self)

    @property
    def address(self) -> str:
        """The ``host:port`` this client talks to."""
        return self._config.address

    def close(self) -> None:
        """Closes the channel (unless it was passed in); open watches end.

        Waits still pending (``result``, ``map``) and handle watches raise
        TetherError (CANCELLED).
        """
        self._watches.close()
        self._outcomes.close()
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
        retry: TaskRetryPolicy | None = None,
        preemptible: bool | None = None,
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
            retry: When a failed attempt runs again (resuming from the task's last
                checkpoint); None: the server's default policy.
            preemptible: Whether a higher-priority task may preempt this one (it is
                queued again and resumes from its checkpoint); None: the server decides
                by task name.

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
            retry=retry,
            preemptible=preemptible,
        )
        coverage = self._outcomes.mark()
        response = self._unary(self._tasks.SubmitTask, request)
        return TaskHandle(
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
    ) -> Iterator[Any]:
        """Runs ``task`` once per item of ``args`` and yields the results as they come.

        Example::

            for square in client.map("demo.square", ({"x": x} for x in range(1000))):
                ...

        ``args`` is read lazily: a task is submitted only while fewer than
        ``max_in_flight`` are submitted and not yet yielded, so a slow consumer holds
        the submissions back (backpressure) and an endless iterable is fine. Every
        wait goes over the client's one outcome stream.

        Args:
            task: The registered task, e.g. ``"demo.echo"``.
            args: The keyword arguments of each run (None: none).
            ordered: Yield in the order of ``args`` (True) or as the tasks end (False).
            max_in_flight: Most tasks submitted and not yet yielded.
            return_exceptions: Yield a task's failure (a TaskOutcomeError) instead of
                raising it.
            labels, priority, timeout, required_tags: As for ``submit``, for every run.

        Raises:
            TaskFailed, TaskInterrupted, TaskTimedOut, TaskCancelled: When the failed
                task's result is reached (unless ``return_exceptions``); iteration ends
                there. Tasks already submitted keep running: ``map`` neither waits for
                nor interrupts them once iteration stops.
        """

        def submit(item: Mapping[str, Any] | None) -> TaskHandle:
            return self.submit(
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

    def _open_stream(self, machine: _watch.WatchMachine) -> ResponseStream:
        return self._tasks.StreamTaskStatus(
            machine.stream_request(),
            timeout=machine.stream_timeout(),
            metadata=self._config.metadata,
        )

    def _list_page(
        self, request: task_service_pb2.ListTasksRequest
    ) -> task_service_pb2.ListTasksResponse:
        return self._unary(self._tasks.ListTasks, request)


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
        submitted: Task | task_pb2.Task | None = None,
        deduplicated: bool = False,
        coverage: _outcomes.Coverage | None = None,
    ) -> None:
        super().__init__(name, submitted=submitted, deduplicated=deduplicated)
        self._client = client
        self._coverage = coverage

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
        Every handle watch of a client shares one server stream (see
        ``tether._shared_watch``): watching many tasks at once costs one stream, not
        one each, and each watch yields what a stream of its own would have.

        Args:
            exclude_progress: Leave out PROGRESS and OUTPUT events.
        """
        machine = self._watch_machine(self._client._config.retry, exclude_progress, None)
        return HandleWatch(self._client, machine, name=self.name, exclude_progress=exclude_progress)

    def result(self, timeout: Seconds | None = None) -> Any:
        """Waits for the task to end and returns its JSON-decoded result.

        Every wait of a client shares one server stream (see ``tether._outcomes``):
        many handles waiting at once cost one stream, not one each, and the stream
        resumes across server restarts without losing a task's end. A task already
        known to have ended is fetched with one GetTask and no stream.

        Raises:
            TaskFailed, TaskInterrupted, TaskTimedOut, TaskCancelled: The task ended
                without succeeding; ``.task`` holds it, error and interrupt record included.
            DeadlineExceeded: ``timeout`` passed first (the task goes on running).
        """
        return _core.task_result(self._final_task(timeout))

    def _final_task(self, timeout: Seconds | None) -> Task:
        outcomes = self._client._outcomes
        if not outcomes.running or self._known_terminal():
            task = self.refresh()
            if task.state.is_terminal:
                return task
        future = outcomes.begin(self.name, self._coverage)
        try:
            return future.result(timeout=_core.wait_seconds(timeout))
        except FutureTimeout:
            raise _core.wait_ran_out() from None
        finally:
            outcomes.finish(self.name, future)
