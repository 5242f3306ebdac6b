"""Memory holds live work only: finished tasks and old events are served from the store,
the same as if they were still in memory, before and after a restart."""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .helpers import error_info, get, stream_token, struct, wait_terminal

SMALL_MEMORY = [*FAST_SERVER_ARGS, "--memory-events", "20", "--task-cache", "3"]


def _replay(stub: task_service_pb2_grpc.TaskServiceStub, token: str) -> list[spb.TaskEvent]:
    """Every event after ``token`` up to now (the stream is read until its first idle checkpoint)."""
    events: list[spb.TaskEvent] = []
    call = stub.StreamTaskStatus(spb.StreamTaskStatusRequest(resume_token=token), timeout=60)
    for response in call:
        if response.HasField("checkpoint"):
            call.cancel()
            break
        events.append(response.task_event)
    return events


def _run(stub: task_service_pb2_grpc.TaskServiceStub, n: int) -> list[str]:
    names = []
    for i in range(n):
        req = spb.SubmitTaskRequest(
            task="demo.echo", args=struct({"value": i}), request_id=f"echo-{i}"
        )
        names.append(stub.SubmitTask(req, timeout=10).task.name)
    for name in names:
        wait_terminal(stub, name)
    return names


def test_finished_tasks_and_old_events_are_served_from_the_store(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "data", extra_args=SMALL_MEMORY) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            token = stream_token(stub)
            names = _run(stub, 30)

            # GetTask of the first (long out of the cache of 3) has its result.
            first = get(stub, names[0])
            assert first.state == tpb.TASK_STATE_SUCCEEDED
            assert first.result.number_value == 0

            # ListTasks pages through all of them, in submission order.
            page1 = stub.ListTasks(spb.ListTasksRequest(page_size=16), timeout=10)
            page2 = stub.ListTasks(
                spb.ListTasksRequest(page_size=16, page_token=page1.next_page_token), timeout=10
            )
            assert [t.name for t in [*page1.tasks, *page2.tasks]] == names
            assert not page2.next_page_token
            done = stub.ListTasks(
                spb.ListTasksRequest(
                    page_size=100, filter=spb.TaskFilter(states=[tpb.TASK_STATE_SUCCEEDED])
                ),
                timeout=10,
            )
            assert len(done.tasks) == 30

            # A resume token from before the 30 tasks replays ~90 events through a memory
            # log of 20: from the store first, then memory, with no gap and no duplicate.
            replayed = _replay(stub, token)
            revisions = [e.revision for e in replayed]
            assert revisions == list(range(revisions[0], revisions[0] + len(revisions)))
            assert {e.task.name for e in replayed} == set(names)
            assert len(replayed) == 3 * 30  # PENDING, RUNNING, SUCCEEDED each

            # A retried submit of a forgotten task gets the same task back.
            again = stub.SubmitTask(
                spb.SubmitTaskRequest(
                    task="demo.echo", args=struct({"value": 0}), request_id="echo-0"
                ),
                timeout=10,
            )
            assert again.task.name == names[0]
            # Interrupting a forgotten finished task is refused as for any finished task.
            try:
                stub.InterruptTask(spb.InterruptTaskRequest(name=names[1]), timeout=10)
            except grpc.RpcError as exc:
                code, reason, _meta, _fields = error_info(exc)
                assert (code, reason) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "TASK_ALREADY_TERMINAL",
                )
            else:
                raise AssertionError("interrupting a finished task was accepted")
            # A single-task stream of a forgotten task sends its final state and ends.
            events = list(
                stub.StreamTaskStatus(spb.StreamTaskStatusRequest(name=names[2]), timeout=10)
            )
            assert [e.task_event.task.state for e in events] == [tpb.TASK_STATE_SUCCEEDED]

        server.stop()
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            stub = task_service_pb2_grpc.TaskServiceStub(channel)
            # The token from before the restart still resumes, from the store.
            replayed_after = _replay(stub, token)
            assert [e.revision for e in replayed_after] == revisions
            assert get(stub, names[-1]).result.number_value == 29
