"""Waiting on many tasks over one stream: the board's rules, then the blocking client's thread.

The first tests drive ``OutcomeBoard`` alone (no I/O). The rest play the server
with grpcio-testing, as ``test_client_sync`` does: a call the test does not take
is never answered, so a wait that returns proves which calls it needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pytest

import tether
from tests.unit.test_client_sync import (
    FAST,
    WAIT,
    ScriptedServer,
    answer,
    ended,
    fail,
    start_outcomes,
    still_running,
    task,
)
from tether import _convert, _outcomes
from tether.v1 import task_pb2, task_service_pb2

SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
FAILED = task_pb2.TASK_STATE_FAILED


def done(name: str, value: Any = None, state: task_pb2.TaskState.ValueType = SUCCEEDED) -> Any:
    final = task(name, state)
    if value is not None:
        final.result.number_value = value
    return final


def submitted(server: ScriptedServer, name: str) -> task_service_pb2.SubmitTaskRequest:
    request, rpc = server.unary("SubmitTask")
    answer(rpc, task_service_pb2.SubmitTaskResponse(task=task(name)))
    return request


# --------------------------------------------------------------------------- the board


def test_a_waiter_of_a_submit_sent_after_the_stream_started_needs_no_check() -> None:
    board: _outcomes.OutcomeBoard[str] = _outcomes.OutcomeBoard()
    before = board.mark()
    board.restart()
    after = board.mark()
    assert board.register("tasks/a", "w1", after).check is False
    assert board.register("tasks/b", "w2", before).check is True
    assert board.register("tasks/c", "w3", None).check is True


def test_a_terminal_task_nobody_waits_for_is_kept_for_its_waiter() -> None:
    board: _outcomes.OutcomeBoard[str] = _outcomes.OutcomeBoard()
    board.restart()
    mark = board.mark()
    final = _convert.task_from_proto(done("tasks/a", 3))
    assert board.resolve(final) == []
    registration = board.register("tasks/a", "w1", mark)
    assert registration.task == final and not registration.check
    assert board.waiting() == 0


def test_an_eviction_since_the_mark_makes_the_waiter_check() -> None:
    board: _outcomes.OutcomeBoard[str] = _outcomes.OutcomeBoard(unclaimed_limit=1)
    board.restart()
    mark = board.mark()
    board.resolve(_convert.task_from_proto(done("tasks/x")))
    board.resolve(_convert.task_from_proto(done("tasks/y")))  # evicts tasks/x
    assert board.register("tasks/a", "w1", mark).check is True


def test_a_restart_names_every_waiter_and_uncovers_older_marks() -> None:
    board: _outcomes.OutcomeBoard[str] = _outcomes.OutcomeBoard()
    board.restart()
    mark = board.mark()
    board.register("tasks/a", "w1", mark)
    board.register("tasks/a", "w2", mark)
    board.register("tasks/b", "w3", mark)
    assert sorted(board.restart()) == ["tasks/a", "tasks/b"]
    assert board.register("tasks/c", "w4", mark).check is True
    final = _convert.task_from_proto(done("tasks/a"))
    assert board.resolve(final) == ["w1", "w2"]


# --------------------------------------------------------------------------- the blocking client


@pytest.fixture
def server() -> ScriptedServer:
    return ScriptedServer()


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[tether.Client]:
    with tether.Client(channel=server.channel, retry=FAST) as client:
        yield client


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield pool.submit


def _results(
    background: Callable[..., Future[Any]], handles: list[tether.TaskHandle]
) -> list[Future[Any]]:
    return [background(handle.result) for handle in handles]


def test_many_waiters_share_one_stream_and_ask_nothing_more(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    first = background(client.submit, "demo.echo")
    submitted(server, "tasks/t0")
    waiting = background(first.result(timeout=WAIT).result)
    still_running(server, "tasks/t0")  # nothing runs yet: maybe it is over
    start_outcomes(server)
    still_running(server, "tasks/t0")  # submitted before the stream: check once
    request, rpc = server.stream()

    handles = []
    for n in range(1, 4):  # submitted while the stream runs: no GetTask at all
        handle = background(client.submit, "demo.echo")
        submitted(server, f"tasks/t{n}")
        handles.append(handle.result(timeout=WAIT))
    results = _results(background, handles)
    for revision, n in enumerate((3, 1, 2, 0), start=10):  # ends in any order
        rpc.send_response(ended(done(f"tasks/t{n}", n), revision))
    assert [r.result(timeout=WAIT) for r in results] == [1, 2, 3]
    assert waiting.result(timeout=WAIT) == 0
    assert request.resume_token == "start"


def test_a_task_that_ended_before_its_wait_began_is_found_on_the_board(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    first = background(client.submit, "demo.echo")
    submitted(server, "tasks/t0")
    waiting = background(first.result(timeout=WAIT).result)
    still_running(server, "tasks/t0")
    start_outcomes(server)
    still_running(server, "tasks/t0")
    _, rpc = server.stream()

    later = background(client.submit, "demo.echo")
    submitted(server, "tasks/t1")
    handle = later.result(timeout=WAIT)
    rpc.send_response(ended(done("tasks/t1", 7), 5))  # before anyone waits for it
    rpc.send_response(ended(done("tasks/t0", 6), 6))
    assert waiting.result(timeout=WAIT) == 6  # the stream got past tasks/t1's end
    assert handle.result(timeout=WAIT) == 7


def test_a_get_handle_wait_of_an_ended_task_opens_no_stream(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    result = background(client.get_handle("t1").result)
    _, rpc = server.unary("GetTask")
    answer(rpc, task_service_pb2.GetTaskResponse(task=done("tasks/t1", 5)))
    assert result.result(timeout=WAIT) == 5


def test_the_stream_resumes_from_its_last_token_without_losing_a_terminal_event(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    first = background(client.get_handle("a").result)
    still_running(server, "tasks/a")
    start_outcomes(server)
    still_running(server, "tasks/a")
    _, rpc = server.stream()
    second = background(client.get_handle("b").result)
    still_running(server, "tasks/b")  # the stream runs: one check, no second stream
    rpc.send_response(ended(done("tasks/a", 1), 4))
    assert first.result(timeout=WAIT) == 1
    fail(rpc, grpc.StatusCode.UNAVAILABLE, "too slow", "SUBSCRIBER_LAGGING")

    resumed, rpc = server.stream()
    assert resumed.resume_token == "tok-4"
    rpc.send_response(ended(done("tasks/a", 1), 4))  # replayed once too many: ignored
    rpc.send_response(ended(done("tasks/b", 2, FAILED), 5))
    with pytest.raises(tether.TaskFailed):
        second.result(timeout=WAIT)


def test_an_expired_token_restarts_the_stream_and_checks_every_waiter(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    result = background(client.get_handle("a").result)
    still_running(server, "tasks/a")
    start_outcomes(server)
    still_running(server, "tasks/a")
    _, rpc = server.stream()
    fail(rpc, grpc.StatusCode.OUT_OF_RANGE, "new controller", "RESUME_TOKEN_EXPIRED")

    start_outcomes(server, token="fresh")
    request, rpc = server.unary("GetTask")  # its end may have fallen in the gap
    assert request.name == "tasks/a"
    answer(rpc, task_service_pb2.GetTaskResponse(task=done("tasks/a", 9)))
    assert result.result(timeout=WAIT) == 9
    restarted, _ = server.stream()
    assert restarted.resume_token == "fresh"


def test_map_submits_no_more_than_max_in_flight_and_yields_in_order(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    results = client.map("demo.echo", ({"value": n} for n in range(3)), max_in_flight=2)
    first = background(next, results)
    start_outcomes(server)  # before the first submit: every task is covered
    _, rpc = server.stream()
    assert submitted(server, "tasks/t0").args["value"] == 0
    assert submitted(server, "tasks/t1").args["value"] == 1
    rpc.send_response(ended(done("tasks/t1", 1), 3))
    rpc.send_response(ended(done("tasks/t0", 0), 4))
    assert first.result(timeout=WAIT) == 0

    rest = background(list, results)
    assert submitted(server, "tasks/t2").args["value"] == 2  # only once 0 was yielded
    rpc.send_response(ended(done("tasks/t2", 2), 5))
    assert rest.result(timeout=WAIT) == [1, 2]


def test_map_as_completed_yields_failures_when_asked_to(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    results = client.map("demo.echo", [{}, {}], ordered=False, return_exceptions=True)
    first = background(next, results)
    start_outcomes(server)
    _, rpc = server.stream()
    submitted(server, "tasks/t0")
    submitted(server, "tasks/t1")
    rpc.send_response(ended(done("tasks/t1", None, FAILED), 3))  # the later task ends first
    failure = first.result(timeout=WAIT)
    assert isinstance(failure, tether.TaskFailed) and failure.task.name == "tasks/t1"
    rpc.send_response(ended(done("tasks/t0", 5), 4))
    assert background(list, results).result(timeout=WAIT) == [5]


def test_map_in_order_raises_a_failure_when_its_result_is_reached(
    server: ScriptedServer, client: tether.Client, background: Callable[..., Future[Any]]
) -> None:
    results = client.map("demo.echo", [{}, {}])
    gathered = background(list, results)
    start_outcomes(server)
    _, rpc = server.stream()
    submitted(server, "tasks/t0")
    submitted(server, "tasks/t1")
    rpc.send_response(ended(done("tasks/t0", None, FAILED), 3))
    with pytest.raises(tether.TaskFailed) as caught:
        gathered.result(timeout=WAIT)
    assert caught.value.task.name == "tasks/t0"


def test_closing_the_client_ends_pending_waits(
    server: ScriptedServer, background: Callable[..., Future[Any]]
) -> None:
    client = tether.Client(channel=server.channel, retry=FAST)
    result = background(client.get_handle("a").result)
    still_running(server, "tasks/a")
    start_outcomes(server)
    still_running(server, "tasks/a")
    server.stream()
    client.close()
    with pytest.raises(tether.TetherError, match="closed") as caught:
        result.result(timeout=WAIT)
    assert caught.value.code is grpc.StatusCode.CANCELLED
