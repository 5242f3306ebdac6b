"""The asyncio client against a scripted in-process grpc.aio server.

grpcio-testing has no asyncio support, so these tests run a tiny servicer on a
loopback port in the test's own event loop; it answers from a script, the same
way the sync tests' scripted server does, and records what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

import tether
from tests.unit.test_client_core import rich_status
from tests.unit.test_client_sync import ended
from tests.unit.test_client_watch import event, listing
from tether.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc

FAST = tether.RetryPolicy(initial_backoff=0.001, max_backoff=0.01, jitter=0)
SNAPSHOT = task_service_pb2.TASK_EVENT_TYPE_SNAPSHOT
RUNNING_T1 = task_pb2.Task(name="tasks/t1", state=task_pb2.TASK_STATE_RUNNING)
Messages = list[task_service_pb2.StreamTaskStatusResponse]


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str, reason: str
) -> None:
    await context.abort_with_status(rpc_status.to_status(rich_status(code, message, reason)))


class ScriptedTaskService(task_service_pb2_grpc.TaskServiceServicer):
    """Answers each call from a script and keeps every request it got."""

    def __init__(self) -> None:
        self.requests: dict[str, list[Any]] = {}
        self.unavailable_submits = 0
        self.streams: list[tuple[Messages, grpc.StatusCode | None, str]] = []
        self.pages: list[task_service_pb2.ListTasksResponse] = []
        self.tasks: dict[str, list[task_pb2.Task]] = {}
        """GetTask's answers per task, in turn; the last one repeats."""

    def _record(self, method: str, request: Any) -> None:
        self.requests.setdefault(method, []).append(request)

    async def SubmitTask(self, request: Any, context: Any) -> Any:
        self._record("SubmitTask", request)
        if len(self.requests["SubmitTask"]) <= self.unavailable_submits:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")
        return task_service_pb2.SubmitTaskResponse(task=task_pb2.Task(name="tasks/t1"))

    async def GetTask(self, request: Any, context: Any) -> Any:
        self._record("GetTask", request)
        answers = self.tasks.get(request.name)
        if not answers:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"task {request.name} does not exist",
                "TASK_NOT_FOUND",
            )
            raise AssertionError("unreachable")
        found = answers.pop(0) if len(answers) > 1 else answers[0]
        return task_service_pb2.GetTaskResponse(task=found)

    async def InterruptTask(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")

    async def ListTasks(self, request: Any, context: Any) -> Any:
        self._record("ListTasks", request)
        if request.page_size == 1 and not self.pages:  # the outcome stream's start token
            return task_service_pb2.ListTasksResponse(resume_token="now")
        return self.pages.pop(0)

    async def StreamTaskStatus(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._record("StreamTaskStatus", request)
        if not self.streams:
            await asyncio.sleep(3600)  # a quiet live stream, until the client hangs up
        messages, code, reason = self.streams.pop(0)
        for message in messages:
            yield message
        if code is not None:
            await _abort(context, code, "scripted end", reason)


@contextlib.asynccontextmanager
async def serving(service: ScriptedTaskService) -> AsyncIterator[tether.AsyncClient]:
    server = grpc.aio.server()
    task_service_pb2_grpc.add_TaskServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with tether.AsyncClient(f"127.0.0.1:{port}", retry=FAST) as client:
            yield client
    finally:
        await server.stop(None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=20))


def test_submit_retries_unavailable_with_the_same_request_id() -> None:
    service = ScriptedTaskService()
    service.unavailable_submits = 2

    async def scenario() -> None:
        async with serving(service) as client:
            handle = await client.submit("demo.echo", {"value": 1})
            assert handle.name == "tasks/t1"

    run(scenario)
    ids = {request.request_id for request in service.requests["SubmitTask"]}
    assert len(service.requests["SubmitTask"]) == 3
    assert len(ids) == 1 and uuid.UUID(ids.pop()).version == 4


def test_a_rich_status_becomes_a_typed_exception() -> None:
    service = ScriptedTaskService()

    async def scenario() -> None:
        async with serving(service) as client:
            with pytest.raises(tether.TaskNotFound) as caught:
                await client.get("missing")
            assert str(caught.value) == "TASK_NOT_FOUND: task tasks/missing does not exist"

    run(scenario)
    assert len(service.requests["GetTask"]) == 1


def test_a_watch_resumes_from_its_last_token_after_unavailable_without_duplicates() -> None:
    service = ScriptedTaskService()
    service.streams = [
        ([event("tasks/a", 1), event("tasks/b", 2)], grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
        ([event("tasks/b", 2), event("tasks/a", 3), event("tasks/b", 4)], None, ""),
    ]

    async def scenario() -> None:
        async with serving(service) as client, client.watch(resume_token="tok-0") as events:
            seen = []
            async for item in events:
                seen.append((item.task.name, item.revision))
                if len(seen) == 4:
                    break
            assert seen == [("tasks/a", 1), ("tasks/b", 2), ("tasks/a", 3), ("tasks/b", 4)]
            assert events.resume_token == "tok-4"

    run(scenario)
    tokens = [request.resume_token for request in service.requests["StreamTaskStatus"]]
    assert tokens[:2] == ["tok-0", "tok-2"]


def test_an_expired_token_makes_the_watch_relist_and_continue() -> None:
    service = ScriptedTaskService()
    service.streams = [
        ([], grpc.StatusCode.OUT_OF_RANGE, "RESUME_TOKEN_EXPIRED"),
        ([event("tasks/a", 10), event("tasks/c", 11)], None, ""),
    ]
    service.pages = [listing(("tasks/a", 10), ("tasks/b", 12), token="list-1")]

    async def scenario() -> None:
        async with serving(service) as client:
            watch = client.watch(resume_token="ancient")
            seen = [await anext(watch) for _ in range(3)]
            await watch.aclose()
            assert [(e.type.name, e.task.name) for e in seen] == [
                ("SNAPSHOT", "tasks/a"),
                ("SNAPSHOT", "tasks/b"),
                ("STATE_CHANGED", "tasks/c"),
            ]

    run(scenario)
    assert service.requests["StreamTaskStatus"][1].resume_token == "list-1"


def test_result_raises_task_interrupted_carrying_the_final_task() -> None:
    service = ScriptedTaskService()
    final = task_pb2.Task(name="tasks/t1", state=task_pb2.TASK_STATE_INTERRUPTED)
    final.error.reason = "INTERRUPTED"
    service.tasks["tasks/t1"] = [RUNNING_T1]
    service.streams = [
        ([], grpc.StatusCode.UNAVAILABLE, ""),
        ([ended(final, 2)], None, ""),
    ]

    async def scenario() -> None:
        async with serving(service) as client:
            with pytest.raises(tether.TaskInterrupted) as caught:
                await client.get_handle("t1").result()
            assert caught.value.task.name == "tasks/t1"

    run(scenario)
    streams = service.requests["StreamTaskStatus"]
    assert [(r.name, r.resume_token) for r in streams] == [("", "now"), ("", "now")]
    assert all(r.view == task_pb2.TASK_VIEW_FULL and r.exclude_progress for r in streams)


def test_result_gives_up_at_its_timeout_while_the_task_goes_on() -> None:
    service = ScriptedTaskService()
    service.tasks["tasks/t1"] = [RUNNING_T1]

    async def scenario() -> None:
        async with serving(service) as client:
            with pytest.raises(tether.DeadlineExceeded):
                await client.get_handle("t1").result(timeout=0.3)

    run(scenario)


def test_list_iterates_across_pages() -> None:
    service = ScriptedTaskService()
    service.pages = [
        listing(("tasks/1", 1), ("tasks/2", 2), token="r", next_page="p2"),
        listing(("tasks/3", 3), token="r"),
    ]

    async def scenario() -> None:
        async with serving(service) as client:
            names = [task.name async for task in client.list(page_size=2)]
            assert names == ["tasks/1", "tasks/2", "tasks/3"]

    run(scenario)
    assert [r.page_token for r in service.requests["ListTasks"]] == ["", "p2"]


# --------------------------------------------------------------------------- the outcome stream


def _finals(*names_values: tuple[str, int]) -> Messages:
    return [
        ended(task_pb2.Task(name=name, state=task_pb2.TASK_STATE_SUCCEEDED, result=_number(v)), rev)
        for rev, (name, v) in enumerate(names_values, start=5)
    ]


def _number(value: int) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=value)


def test_many_results_share_one_stream_across_an_unavailable() -> None:
    service = ScriptedTaskService()
    for name in ("tasks/a", "tasks/b", "tasks/c"):
        service.tasks[name] = [task_pb2.Task(name=name, state=task_pb2.TASK_STATE_RUNNING)]
    finals = _finals(("tasks/a", 1), ("tasks/b", 2), ("tasks/c", 3))
    service.streams = [
        (finals[:1], grpc.StatusCode.UNAVAILABLE, "SUBSCRIBER_LAGGING"),
        (finals, None, ""),  # resumed after a's end, which the server replays: dropped
    ]

    async def scenario() -> None:
        async with serving(service) as client:
            handles = [client.get_handle(name) for name in ("a", "b", "c")]
            results = await asyncio.gather(*(handle.result() for handle in handles))
            assert results == [1, 2, 3]

    run(scenario)
    streams = service.requests["StreamTaskStatus"]
    assert [r.resume_token for r in streams] == ["now", "tok-5"]


def test_async_map_yields_in_order_with_backpressure() -> None:
    service = ScriptedTaskService()
    service.streams = [(_finals(("tasks/t1", 7)), None, "")]

    async def scenario() -> None:
        async with serving(service) as client:
            values = [v async for v in client.map("demo.echo", [{"n": 1}], max_in_flight=1)]
            assert values == [7]

    run(scenario)
    assert [r.resume_token for r in service.requests["StreamTaskStatus"]] == ["now"]
    assert "GetTask" not in service.requests  # submitted after the stream started: covered


def test_a_handle_watch_joins_the_shared_stream_and_resumes_it_after_unavailable() -> None:
    service = ScriptedTaskService()
    service.pages = [
        task_service_pb2.ListTasksResponse(
            tasks=[task_pb2.Task(name="tasks/t1", state=RUNNING_T1.state, revision=1)],
            resume_token="tok-0",
        )
    ]
    done = task_pb2.TASK_STATE_SUCCEEDED
    service.streams = [
        ([event("tasks/t1", 1), event("tasks/t1", 2)], grpc.StatusCode.UNAVAILABLE, ""),
        ([event("tasks/t1", 2), event("tasks/t1", 3, state=done)], None, ""),
    ]

    async def scenario() -> None:
        async with serving(service) as client:
            seen = [(e.type.name, e.revision) async for e in client.get_handle("t1").watch()]
            assert seen == [("SNAPSHOT", 1), ("STATE_CHANGED", 2), ("STATE_CHANGED", 3)]

    run(scenario)
    (listed,) = service.requests["ListTasks"]
    assert list(listed.filter.names) == ["tasks/t1"] and listed.view == task_pb2.TASK_VIEW_BASIC
    first, resumed = service.requests["StreamTaskStatus"]
    assert list(first.filter.names) == ["tasks/t1"] and not first.name
    assert (first.resume_token, resumed.resume_token) == ("tok-0", "tok-2")


def test_a_handle_watch_of_an_unknown_task_raises_task_not_found() -> None:
    service = ScriptedTaskService()
    service.pages = [task_service_pb2.ListTasksResponse(resume_token="tok-0")]

    async def scenario() -> None:
        async with serving(service) as client:
            with pytest.raises(tether.TaskNotFound):
                await anext(client.get_handle("nope").watch())

    run(scenario)
    assert [request.name for request in service.requests["GetTask"]] == ["tasks/nope"]
    assert "StreamTaskStatus" not in service.requests
