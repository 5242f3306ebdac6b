"""The blocking client against a server played message by message (grpcio-testing).

Each test runs the client in a background thread and answers its calls from the
test, so that what the client sends on a retry, a resumption or a re-list can be
checked exactly.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import message as protobuf_message
from grpc_status import rpc_status

import tether
from tests.unit.test_client_core import rich_status
from tests.unit.test_client_watch import checkpoint, event, listing
from tether.v1 import cluster_service_pb2, task_pb2, task_service_pb2

TASK_SERVICE = task_service_pb2.DESCRIPTOR.services_by_name["TaskService"]
CLUSTER_SERVICE = cluster_service_pb2.DESCRIPTOR.services_by_name["ClusterService"]
OK = grpc.StatusCode.OK
FAST = tether.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, jitter=0)
WAIT = 10.0  # seconds any single step of a test may take before it counts as hung

T = TypeVar("T")


class ScriptedServer:
    """The server's side of a grpc_testing channel: take each call, answer it."""

    def __init__(self) -> None:
        self.channel = grpc_testing.channel(
            [TASK_SERVICE, CLUSTER_SERVICE], grpc_testing.strict_real_time()
        )

    def unary(self, method: str) -> tuple[Any, Any]:
        service = CLUSTER_SERVICE if method == "GetCluster" else TASK_SERVICE
        _, request, rpc = self.channel.take_unary_unary(service.methods_by_name[method])
        return request, rpc

    def stream(self) -> tuple[task_service_pb2.StreamTaskStatusRequest, Any]:
        _, request, rpc = self.channel.take_unary_stream(
            TASK_SERVICE.methods_by_name["StreamTaskStatus"]
        )
        return request, rpc


def answer(rpc: Any, response: protobuf_message.Message) -> None:
    rpc.terminate(response, (), OK, "")


def fail(rpc: Any, code: grpc.StatusCode, message: str, reason: str = "", **kw: Any) -> None:
    """Ends a call the way tether-server does: code, message and a rich status."""
    if not reason:
        trailers: tuple[tuple[str, bytes], ...] = ()
    else:
        status = rpc_status.to_status(rich_status(code, message, reason, **kw))
        trailers = status.trailing_metadata
    if hasattr(rpc, "send_response"):
        rpc.terminate(trailers, code, message)
    else:
        rpc.terminate(None, trailers, code, message)


def task(name: str, state: int = task_pb2.TASK_STATE_PENDING, **fields: Any) -> task_pb2.Task:
    return task_pb2.Task(name=name, task="demo.echo", state=state, **fields)  # type: ignore[arg-type]


@pytest.fixture
def server() -> ScriptedServer:
    return ScriptedServer()


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[tether.Client]:
    with tether.Client(channel=server.channel, retry=FAST) as client:
        yield client


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(max_workers=2) as pool:

        def run(function: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
            return pool.submit(function, *args, **kwargs)

        yield run


class Consumer:
    """Iterates a watch on a thread of its own; the test takes items as they come."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
        self._thread.start()

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                self.items.put(item)
        except BaseException as exc:
            self.items.put(exc)

    def take(self, count: int) -> list[Any]:
        return [self.items.get(timeout=WAIT) for _ in range(count)]

    def nothing_more(self) -> bool:
        return self.items.empty()

    def ended(self) -> bool:
        """Whether the iteration ends (waiting for it at most ``WAIT``)."""
        self._thread.join(timeout=WAIT)
        return not self._thread.is_alive()


# --------------------------------------------------------------------------- unary calls


def test_submit_retries_unavailable_with_the_same_request_id(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    submitted = background(client.submit, "demo.echo", {"message": "hi"}, labels={"a": "b"})
    first, rpc = server.unary("SubmitTask")
    fail(rpc, grpc.StatusCode.UNAVAILABLE, "connection reset")
    second, rpc = server.unary("SubmitTask")
    fail(rpc, grpc.StatusCode.UNAVAILABLE, "server shutting down", "SHUTTING_DOWN")
    third, rpc = server.unary("SubmitTask")
    answer(rpc, task_service_pb2.SubmitTaskResponse(task=task("tasks/t1"), deduplicated=True))

    handle = submitted.result(timeout=WAIT)
    assert uuid.UUID(first.request_id).version == 4
    assert first.request_id == second.request_id == third.request_id
    assert first == third
    assert (handle.name, handle.id, handle.deduplicated) == ("tasks/t1", "t1", True)
    assert handle.submitted is not None and handle.submitted.state is tether.TaskState.PENDING


def test_unavailable_is_raised_once_the_attempts_are_spent(
    server: ScriptedServer, background: Callable[..., Future[Any]]
) -> None:
    policy = tether.RetryPolicy(max_attempts=3, initial_backoff=0.001, jitter=0)
    client = tether.Client(channel=server.channel, retry=policy)
    got = background(client.get, "t1")
    for _ in range(3):
        _, rpc = server.unary("GetTask")
        fail(rpc, grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(tether.Unavailable, match="connection refused"):
        got.result(timeout=WAIT)


def test_a_rich_status_becomes_a_typed_exception_and_is_not_retried(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    interrupted = background(client.interrupt, "t1", reason="stop")
    request, rpc = server.unary("InterruptTask")
    fail(
        rpc,
        grpc.StatusCode.FAILED_PRECONDITION,
        "task tasks/t1 already SUCCEEDED",
        "TASK_ALREADY_TERMINAL",
        metadata={"task": "tasks/t1", "state": "SUCCEEDED"},
    )
    with pytest.raises(tether.TaskAlreadyTerminal) as caught:
        interrupted.result(timeout=WAIT)
    assert request.name == "tasks/t1"
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.metadata == {"task": "tasks/t1", "state": "SUCCEEDED"}
    assert str(caught.value) == "TASK_ALREADY_TERMINAL: task tasks/t1 already SUCCEEDED"


def test_invalid_argument_carries_its_field_violations(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    submitted = background(client.submit, "demo.echo", grace=3600)
    _, rpc = server.unary("SubmitTask")
    fail(
        rpc,
        grpc.StatusCode.INVALID_ARGUMENT,
        "grace too long",
        "INVALID_GRACE",
        violations=(("grace.sigint", "at most 60s"),),
    )
    with pytest.raises(tether.InvalidArgument) as caught:
        submitted.result(timeout=WAIT)
    assert caught.value.reason == "INVALID_GRACE"
    assert caught.value.violations == [tether.FieldViolation("grace.sigint", "at most 60s")]


def test_get_accepts_a_bare_id_and_returns_a_typed_task(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    got = background(client.get, "abc")
    request, rpc = server.unary("GetTask")
    answer(
        rpc,
        task_service_pb2.GetTaskResponse(
            task=task("tasks/abc", task_pb2.TASK_STATE_RUNNING, engine_id=0, attempt=1)
        ),
    )
    found = got.result(timeout=WAIT)
    assert request.name == "tasks/abc"
    assert request.view == task_pb2.TASK_VIEW_FULL
    assert (found.name, found.state, found.engine_id) == ("tasks/abc", tether.TaskState.RUNNING, 0)


def test_list_fetches_the_next_page_only_when_iteration_reaches_it(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    tasks = client.list(tether.TaskFilter(labels={"team": "a"}), page_size=2)
    first_two = background(lambda: [next(tasks).name, next(tasks).name])
    request, rpc = server.unary("ListTasks")
    answer(
        rpc,
        task_service_pb2.ListTasksResponse(
            tasks=[task("tasks/1"), task("tasks/2")], next_page_token="p2"
        ),
    )
    assert first_two.result(timeout=WAIT) == ["tasks/1", "tasks/2"]
    assert (request.page_size, dict(request.filter.labels)) == (2, {"team": "a"})

    rest = background(lambda: [t.name for t in tasks])
    request, rpc = server.unary("ListTasks")
    answer(rpc, task_service_pb2.ListTasksResponse(tasks=[task("tasks/3")]))
    assert rest.result(timeout=WAIT) == ["tasks/3"]
    assert request.page_token == "p2"


def test_cluster_returns_engines_and_limits(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    got = background(client.cluster)
    _, rpc = server.unary("GetCluster")
    response = cluster_service_pb2.GetClusterResponse(
        engines=[
            cluster_service_pb2.Engine(
                id=0, state=cluster_service_pb2.ENGINE_STATE_BUSY, current_task="tasks/t1"
            )
        ],
        mode=cluster_service_pb2.CLUSTER_MODE_EMBEDDED,
        target_size=1,
        limits=cluster_service_pb2.ServerLimits(max_page_size=1000),
    )
    answer(rpc, response)
    cluster = got.result(timeout=WAIT)
    assert cluster.mode is tether.ClusterMode.EMBEDDED
    assert cluster.engines[0].state is tether.EngineState.BUSY
    assert cluster.engines[0].current_task == "tasks/t1"
    assert cluster.limits.max_page_size == 1000


# --------------------------------------------------------------------------- watches


def test_a_watch_resumes_from_its_last_token_after_unavailable_without_duplicates(
    server: ScriptedServer, client: tether.Client
) -> None:
    with client.watch(resume_token="tok-0") as events:
        consumer = Consumer(events)
        request, rpc = server.stream()
        assert request.resume_token == "tok-0"
        rpc.send_response(event("tasks/a", 1))
        rpc.send_response(event("tasks/b", 2))
        consumer.take(2)
        fail(rpc, grpc.StatusCode.UNAVAILABLE, "server restarting")

        request, rpc = server.stream()
        assert request.resume_token == "tok-2"
        rpc.send_response(event("tasks/b", 2))  # the server replays one event too many
        rpc.send_response(event("tasks/a", 3))
        rpc.send_response(checkpoint(4))
        rpc.send_response(event("tasks/b", 5))
        later = consumer.take(2)
        assert [(e.task.name, e.revision) for e in later] == [("tasks/a", 3), ("tasks/b", 5)]
        assert events.resume_token == "tok-5"
        assert consumer.nothing_more()


def test_a_watch_survives_the_server_ending_the_stream_and_a_lagging_cutoff(
    server: ScriptedServer, client: tether.Client
) -> None:
    with client.watch() as events:
        consumer = Consumer(events)
        _, rpc = server.stream()
        rpc.send_response(event("tasks/a", 1))
        consumer.take(1)
        fail(rpc, grpc.StatusCode.UNAVAILABLE, "too slow", "SUBSCRIBER_LAGGING")
        request, rpc = server.stream()
        assert request.resume_token == "tok-1"
        rpc.terminate((), OK, "")
        request, rpc = server.stream()
        assert request.resume_token == "tok-1"
        rpc.send_response(event("tasks/a", 2))
        assert consumer.take(1)[0].revision == 2


def test_an_expired_token_makes_the_watch_relist_then_continue_from_the_listing(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    task_filter = tether.TaskFilter(states=[tether.TaskState.RUNNING])
    with client.watch(task_filter, resume_token="ancient") as events:
        consumer = Consumer(events)
        _, rpc = server.stream()
        fail(rpc, grpc.StatusCode.OUT_OF_RANGE, "token expired", "RESUME_TOKEN_EXPIRED")

        request, rpc = server.unary("ListTasks")
        assert list(request.filter.states) == [task_pb2.TASK_STATE_RUNNING]
        answer(rpc, listing(("tasks/a", 10), token="list-1", next_page="p2"))
        request, rpc = server.unary("ListTasks")
        assert request.page_token == "p2"
        answer(rpc, listing(("tasks/b", 12), token="list-2"))
        snapshots = consumer.take(2)
        assert [(e.type, e.task.name) for e in snapshots] == [
            (tether.TaskEventType.SNAPSHOT, "tasks/a"),
            (tether.TaskEventType.SNAPSHOT, "tasks/b"),
        ]

        request, rpc = server.stream()
        assert request.resume_token == "list-1"
        assert list(request.filter.states) == [task_pb2.TASK_STATE_RUNNING]
        rpc.send_response(event("tasks/a", 10))  # already shown by its snapshot
        rpc.send_response(event("tasks/c", 11))
        assert [(e.task.name, e.revision) for e in consumer.take(1)] == [("tasks/c", 11)]


def test_a_watch_that_is_refused_raises_the_typed_error(
    server: ScriptedServer, client: tether.Client
) -> None:
    consumer = Consumer(client.watch(resume_token="garbage"))
    _, rpc = server.stream()
    fail(rpc, grpc.StatusCode.INVALID_ARGUMENT, "bad token", "INVALID_RESUME_TOKEN")
    raised = consumer.take(1)[0]
    assert isinstance(raised, tether.InvalidArgument)
    assert raised.reason == "INVALID_RESUME_TOKEN"


# --------------------------------------------------------------------------- handles


def ended(final: task_pb2.Task, revision: int) -> task_service_pb2.StreamTaskStatusResponse:
    """The outcome stream's message for ``final`` reaching its terminal state."""
    finished = task_pb2.Task()
    finished.CopyFrom(final)
    finished.revision = revision
    return task_service_pb2.StreamTaskStatusResponse(
        resume_token=f"tok-{revision}",
        task_event=task_service_pb2.TaskEvent(
            type=task_service_pb2.TASK_EVENT_TYPE_STATE_CHANGED, task=finished, revision=revision
        ),
    )


def start_outcomes(server: ScriptedServer, token: str = "start") -> None:
    """Answers the ListTasks the outcome stream takes its first token from."""
    request, rpc = server.unary("ListTasks")
    assert request.page_size == 1
    answer(rpc, task_service_pb2.ListTasksResponse(resume_token=token))


def still_running(server: ScriptedServer, name: str) -> None:
    """Answers one GetTask of ``name``: it has not ended yet."""
    request, rpc = server.unary("GetTask")
    assert request.name == name
    answer(rpc, task_service_pb2.GetTaskResponse(task=task(name, task_pb2.TASK_STATE_RUNNING)))


def _finish(
    server: ScriptedServer, final: task_pb2.Task
) -> task_service_pb2.StreamTaskStatusRequest:
    """Plays a wait on a task of ``get_handle``: checks, then the outcome stream, restarted once."""
    still_running(server, final.name)  # not over yet: no stream needed?
    start_outcomes(server)
    still_running(server, final.name)  # the stream now covers it: still not over
    request, rpc = server.stream()
    fail(rpc, grpc.StatusCode.UNAVAILABLE, "server restarting")
    resumed, rpc = server.stream()
    assert resumed.resume_token == "start"
    rpc.send_response(ended(final, 2))
    return request


def test_result_returns_the_decoded_value_of_a_succeeded_task(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    final = task("tasks/t1", task_pb2.TASK_STATE_SUCCEEDED)
    final.result.struct_value.update({"echo": "hi", "n": 20})
    result = background(client.get_handle("t1").result)
    request = _finish(server, final)
    assert result.result(timeout=WAIT) == {"echo": "hi", "n": 20}
    assert (request.name, request.resume_token) == ("", "start")
    assert request.exclude_progress and request.view == task_pb2.TASK_VIEW_FULL
    assert {tether.TaskState(s) for s in request.filter.states} == {
        s for s in tether.TaskState if s.is_terminal
    }


def test_result_raises_task_interrupted_carrying_the_final_task(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    final = task("tasks/t1", task_pb2.TASK_STATE_INTERRUPTED)
    final.error.reason = "INTERRUPTED"
    final.error.type = "KeyboardInterrupt"
    final.interrupt.requested_by = "alice"
    final.interrupt.final_stage = task_pb2.ESCALATION_STAGE_SIGINT
    result = background(client.get_handle("t1").result)
    _finish(server, final)
    with pytest.raises(tether.TaskInterrupted) as caught:
        result.result(timeout=WAIT)
    assert caught.value.task.interrupt is not None
    assert caught.value.task.interrupt.final_stage is tether.EscalationStage.SIGINT
    assert caught.value.reason == "INTERRUPTED"


def _join(server: ScriptedServer, *tasks: task_pb2.Task, token: str) -> list[str]:
    """Answers the listing of joining watches; returns the names it asked for."""
    request, rpc = server.unary("ListTasks")
    assert request.view == task_pb2.TASK_VIEW_BASIC
    answer(rpc, task_service_pb2.ListTasksResponse(tasks=tasks, resume_token=token))
    return list(request.filter.names)


def _watching(
    server: ScriptedServer, client: tether.Client, name: str, revision: int
) -> tuple[Consumer, Any]:
    """A handle watch of a RUNNING task at ``revision``, joined: its consumer and stream."""
    consumer = Consumer(client.get_handle(name).watch())
    running = task(f"tasks/{name}", task_pb2.TASK_STATE_RUNNING, revision=revision)
    _join(server, running, token=f"tok-{revision}")
    _, rpc = server.stream()
    return consumer, rpc


def test_a_handle_watch_lists_its_task_then_streams_it_by_name_until_the_terminal_event(
    server: ScriptedServer, client: tether.Client
) -> None:
    consumer = Consumer(client.get_handle("t1").watch())
    running = task("tasks/t1", task_pb2.TASK_STATE_RUNNING, revision=1)
    assert _join(server, running, token="tok-0") == ["tasks/t1"]
    request, rpc = server.stream()
    assert list(request.filter.names) == ["tasks/t1"] and not request.name
    assert request.resume_token == "tok-0" and not request.send_initial_state
    assert not request.exclude_progress
    rpc.send_response(event("tasks/t1", 1))  # the snapshot showed it already
    rpc.send_response(event("tasks/t1", 2, state=task_pb2.TASK_STATE_FAILED))
    items = consumer.take(2)
    assert [(e.type, e.revision, e.task.state) for e in items] == [
        (tether.TaskEventType.SNAPSHOT, 1, tether.TaskState.RUNNING),
        (tether.TaskEventType.STATE_CHANGED, 2, tether.TaskState.FAILED),
    ]
    assert consumer.ended()


def test_a_second_handle_watch_reopens_the_shared_stream_from_its_last_token(
    server: ScriptedServer, client: tether.Client
) -> None:
    first, rpc = _watching(server, client, "a", 3)
    rpc.send_response(event("tasks/a", 5))
    assert [e.revision for e in first.take(2)] == [3, 5]
    second = Consumer(client.get_handle("b").watch())
    # The shared stream is cancelled; b is listed; the stream reopens from a's last token.
    assert _join(server, task("tasks/b", revision=4), token="ignored") == ["tasks/b"]
    request, rpc = server.stream()
    assert list(request.filter.names) == ["tasks/a", "tasks/b"]
    assert request.resume_token == "tok-5"
    rpc.send_response(event("tasks/b", 4))  # shown by b's snapshot: dropped
    rpc.send_response(event("tasks/a", 6, state=task_pb2.TASK_STATE_SUCCEEDED))
    rpc.send_response(event("tasks/b", 7, state=task_pb2.TASK_STATE_FAILED))
    assert [e.revision for e in first.take(1)] == [6]
    assert [(e.type, e.revision) for e in second.take(2)] == [
        (tether.TaskEventType.SNAPSHOT, 4),
        (tether.TaskEventType.STATE_CHANGED, 7),
    ]
    assert first.ended() and second.ended()


def test_a_handle_watch_of_an_unknown_task_raises_task_not_found(
    server: ScriptedServer, client: tether.Client
) -> None:
    consumer = Consumer(client.get_handle("nope").watch())
    _join(server, token="tok-0")
    request, rpc = server.unary("GetTask")
    assert request.name == "tasks/nope" and request.view == task_pb2.TASK_VIEW_BASIC
    fail(rpc, grpc.StatusCode.NOT_FOUND, "task tasks/nope does not exist", "TASK_NOT_FOUND")
    (error,) = consumer.take(1)
    assert isinstance(error, tether.TaskNotFound)


def test_a_handle_watch_resumes_the_shared_stream_after_unavailable(
    server: ScriptedServer, client: tether.Client
) -> None:
    consumer, rpc = _watching(server, client, "t1", 1)
    rpc.send_response(event("tasks/t1", 2))
    assert [e.revision for e in consumer.take(2)] == [1, 2]
    fail(rpc, grpc.StatusCode.UNAVAILABLE, "server restarting")
    resumed, rpc = server.stream()
    assert resumed.resume_token == "tok-2" and list(resumed.filter.names) == ["tasks/t1"]
    rpc.send_response(event("tasks/t1", 2))
    rpc.send_response(event("tasks/t1", 3, state=task_pb2.TASK_STATE_SUCCEEDED))
    assert [e.revision for e in consumer.take(1)] == [3]
    assert consumer.ended() and consumer.nothing_more()


def test_closing_a_watch_from_another_thread_ends_its_iteration_quietly(
    server: ScriptedServer, client: tether.Client
) -> None:
    events = client.watch()
    consumer = Consumer(events)
    _, rpc = server.stream()
    rpc.send_response(event("tasks/a", 1))
    consumer.take(1)
    events.close()
    consumer._thread.join(timeout=WAIT)
    assert not consumer._thread.is_alive()
    assert consumer.nothing_more()
