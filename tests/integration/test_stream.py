"""StreamTaskStatus: resume without gap or duplicate, fan-out, lagging subscribers, tokens."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid

import grpc
import pytest

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .helpers import TERMINAL, error_info, stream_token, struct, submit, wait_terminal


def _filter(run: str) -> spb.TaskFilter:
    return spb.TaskFilter(labels={"run": run})


def _replay(stub, token: str, run: str, until_terminal: int) -> list[int]:  # type: ignore[no-untyped-def]
    """All event revisions for the run after ``token``, read in one go."""
    revisions: list[int] = []
    terminal = 0
    call = stub.StreamTaskStatus(
        spb.StreamTaskStatusRequest(filter=_filter(run), resume_token=token)
    )
    for resp in call:
        if resp.HasField("task_event"):
            revisions.append(resp.task_event.revision)
            if (
                resp.task_event.type == spb.TASK_EVENT_TYPE_STATE_CHANGED
                and resp.task_event.task.state in TERMINAL
            ):
                terminal += 1
                if terminal == until_terminal:
                    call.cancel()
                    break
    return revisions


def test_single_task_stream_sends_state_changes_and_ends_ok_after_the_terminal_event(tasks):  # type: ignore[no-untyped-def]
    task = submit(tasks, "demo.count", args={"n": 5, "interval": 0.02})
    events = list(tasks.StreamTaskStatus(spb.StreamTaskStatusRequest(name=task.name), timeout=30))
    kinds = [e.task_event.type for e in events if e.HasField("task_event")]
    states = [e.task_event.task.state for e in events if e.HasField("task_event")]
    assert kinds[0] == spb.TASK_EVENT_TYPE_SNAPSHOT
    assert states[-1] == tpb.TASK_STATE_SUCCEEDED
    assert kinds.count(spb.TASK_EVENT_TYPE_OUTPUT) == 5
    chunks = [
        e.task_event.output_chunk for e in events if e.task_event.type == spb.TASK_EVENT_TYPE_OUTPUT
    ]
    assert chunks == [f"step {i}\n" for i in range(5)] or len(chunks) == 5
    revs = [
        e.task_event.revision for e in events if e.task_event.type != spb.TASK_EVENT_TYPE_SNAPSHOT
    ]
    assert revs == sorted(set(revs))


def test_subscriber_disconnected_at_random_moments_gets_every_event_exactly_once_in_order(tasks):  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex[:12]
    start_token = tasks.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10).resume_token
    n_tasks = 200
    received: list[int] = []
    terminal = 0
    rng = random.Random(7)
    done_submitting = threading.Event()

    def produce() -> None:
        for i in range(n_tasks):
            submit(tasks, "demo.echo", args={"value": i}, labels={"run": run})
        done_submitting.set()

    producer = threading.Thread(target=produce)
    producer.start()
    token = start_token
    reconnects = 0
    while terminal < n_tasks:
        budget = rng.randint(1, 60)
        call = tasks.StreamTaskStatus(
            spb.StreamTaskStatusRequest(
                filter=_filter(run), resume_token=token, checkpoint_interval=_sec(0.2)
            )
        )
        try:
            for resp in call:
                token = resp.resume_token
                if resp.HasField("task_event"):
                    received.append(resp.task_event.revision)
                    ev = resp.task_event
                    if ev.type == spb.TASK_EVENT_TYPE_STATE_CHANGED and ev.task.state in TERMINAL:
                        terminal += 1
                budget -= 1
                if budget <= 0 or terminal >= n_tasks:
                    break
        finally:
            call.cancel()
        reconnects += 1
    producer.join()
    assert reconnects > 5
    assert received == sorted(received)
    assert len(received) == len(set(received))
    assert received == _replay(tasks, start_token, run, n_tasks)


def _sec(x: float):  # type: ignore[no-untyped-def]
    from .helpers import seconds

    return seconds(x)


def test_two_hundred_concurrent_subscribers_see_identical_sequences(server, tasks):  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex[:12]
    n_subscribers, n_tasks = 200, 50

    async def main() -> list[list[int]]:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            token = (await stub.ListTasks(spb.ListTasksRequest(page_size=1))).resume_token
            ready = asyncio.Event()

            async def subscriber() -> list[int]:
                seen: list[int] = []
                terminal = 0
                call = stub.StreamTaskStatus(
                    spb.StreamTaskStatusRequest(filter=_filter(run), resume_token=token)
                )
                async for resp in call:
                    if resp.HasField("task_event"):
                        seen.append(resp.task_event.revision)
                        ev = resp.task_event
                        if (
                            ev.type == spb.TASK_EVENT_TYPE_STATE_CHANGED
                            and ev.task.state in TERMINAL
                        ):
                            terminal += 1
                            if terminal == n_tasks:
                                call.cancel()
                                break
                return seen

            subs = [asyncio.ensure_future(subscriber()) for _ in range(n_subscribers)]
            ready.set()
            await asyncio.sleep(0.5)
            for i in range(n_tasks):
                await stub.SubmitTask(
                    spb.SubmitTaskRequest(
                        task="demo.echo", args=struct({"value": i}), labels={"run": run}
                    )
                )
            return await asyncio.wait_for(asyncio.gather(*subs), timeout=120)

    sequences = asyncio.run(main())
    first = sequences[0]
    assert len(first) >= 3 * n_tasks  # PENDING, RUNNING, SUCCEEDED per task
    assert all(seq == first for seq in sequences)


def test_slow_subscriber_is_cut_off_as_lagging_while_others_keep_pace(tasks, server):  # type: ignore[no-untyped-def]
    token = tasks.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10).resume_token
    # A small, fixed HTTP/2 window so the transport cannot soak up the backlog for the reader.
    slow_channel = grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)])
    slow = task_service_pb2_grpc.TaskServiceStub(slow_channel).StreamTaskStatus(
        spb.StreamTaskStatusRequest(resume_token=token)
    )
    first = next(iter(slow))  # opened; now stop reading
    fast_count = 0
    # 3,000 events at ~400/s: far more than the slow reader's queue and HTTP/2 window hold,
    # at a pace any reader that reads keeps up with, even on a loaded CI box.
    task = submit(tasks, "demo.count", args={"n": 1500, "interval": 0.005})
    for _resp in tasks.StreamTaskStatus(spb.StreamTaskStatusRequest(name=task.name), timeout=120):
        fast_count += 1
    assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED
    assert fast_count > 3000
    with pytest.raises(grpc.RpcError) as caught:
        for _ in slow:
            pass
    code, reason, _, _ = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "SUBSCRIBER_LAGGING")
    assert first.resume_token
    slow_channel.close()


def test_idle_stream_gets_checkpoints_that_advance_the_token(tasks):  # type: ignore[no-untyped-def]
    run = uuid.uuid4().hex[:12]
    call = tasks.StreamTaskStatus(
        spb.StreamTaskStatusRequest(
            filter=_filter(run), checkpoint_interval=_sec(0.2), send_initial_state=True
        )
    )
    seen = []
    t0 = time.monotonic()
    for resp in call:
        seen.append(resp)
        if len(seen) >= 3:
            break
    call.cancel()
    assert time.monotonic() - t0 < 5
    assert seen[0].checkpoint.initial_state_complete
    assert all(r.HasField("checkpoint") for r in seen)
    assert all(r.resume_token for r in seen)


def test_expired_and_foreign_tokens_are_refused_with_out_of_range(tasks):  # type: ignore[no-untyped-def]
    import base64

    foreign = base64.urlsafe_b64encode(b"t1|" + b"0" * 32 + b"|5").decode().rstrip("=")
    with pytest.raises(grpc.RpcError) as caught:
        list(tasks.StreamTaskStatus(spb.StreamTaskStatusRequest(resume_token=foreign), timeout=5))
    code, reason, _metadata, _ = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.OUT_OF_RANGE, "RESUME_TOKEN_EXPIRED")
    with pytest.raises(grpc.RpcError) as caught:
        list(
            tasks.StreamTaskStatus(
                spb.StreamTaskStatusRequest(resume_token="%%%not-a-token"), timeout=5
            )
        )
    code, reason, _, fields = error_info(caught.value)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RESUME_TOKEN",
        ["resume_token"],
    )


def test_client_disconnect_never_touches_the_task(tasks):  # type: ignore[no-untyped-def]
    task = submit(tasks, "demo.sleep", args={"seconds": 0.5})
    call = tasks.StreamTaskStatus(spb.StreamTaskStatusRequest(name=task.name))
    next(iter(call))
    call.cancel()
    assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED


def _until_ended(
    stub, request: spb.StreamTaskStatusRequest, names: set[str]
) -> list[spb.TaskEvent]:  # type: ignore[no-untyped-def]
    """A stream's task events until each of ``names`` has had its terminal state change."""
    events: list[spb.TaskEvent] = []
    running = set(names)
    call = stub.StreamTaskStatus(request, timeout=60)
    for response in call:
        if not response.HasField("task_event"):
            continue
        event = response.task_event
        events.append(event)
        if event.type == spb.TASK_EVENT_TYPE_STATE_CHANGED and event.task.state in TERMINAL:
            running.discard(event.task.name)
            if not running:
                call.cancel()
                break
    return events


def _shape(event: spb.TaskEvent) -> tuple[str, int, int, int, str]:
    return (event.task.name, event.revision, event.type, event.task.state, event.output_chunk)


def test_a_names_filter_stream_carries_every_event_of_its_tasks_like_single_task_streams(tasks):  # type: ignore[no-untyped-def]
    token = stream_token(tasks)
    counting = [submit(tasks, "demo.count", args={"n": 3, "interval": 0.02}) for _ in range(2)]
    failing = submit(tasks, "demo.fail", args={"message": "boom"})
    submit(tasks, "demo.echo", args={"value": "not watched"})
    names = {task.name for task in [*counting, failing]}
    per_task = {
        name: [
            _shape(response.task_event)
            for response in tasks.StreamTaskStatus(
                spb.StreamTaskStatusRequest(name=name, resume_token=token), timeout=60
            )
            if response.HasField("task_event")
        ]  # a single-task stream ends after its task's terminal event
        for name in names
    }
    by_names = spb.TaskFilter(names=sorted(names))
    shared = _until_ended(
        tasks, spb.StreamTaskStatusRequest(filter=by_names, resume_token=token), names
    )
    assert {e.task.name for e in shared} == names
    assert [e.revision for e in shared] == sorted({e.revision for e in shared})
    for name in names:
        assert [_shape(e) for e in shared if e.task.name == name] == per_task[name]
    quiet = _until_ended(
        tasks,
        spb.StreamTaskStatusRequest(filter=by_names, resume_token=token, exclude_progress=True),
        names,
    )
    assert [_shape(e) for e in quiet] == [
        _shape(e)
        for e in shared
        if e.type not in (spb.TASK_EVENT_TYPE_PROGRESS, spb.TASK_EVENT_TYPE_OUTPUT)
    ]


def test_list_tasks_by_names_returns_exactly_those_tasks_in_submission_order(tasks):  # type: ignore[no-untyped-def]
    made = [submit(tasks, "demo.echo", args={"value": n}) for n in range(5)]
    wanted = [made[3].name, made[0].name, made[4].name, "tasks/neverexisted"]
    first = tasks.ListTasks(
        spb.ListTasksRequest(page_size=2, filter=spb.TaskFilter(names=wanted)), timeout=10
    )
    assert [t.name for t in first.tasks] == [made[0].name, made[3].name]
    assert first.next_page_token and first.resume_token
    rest = tasks.ListTasks(
        spb.ListTasksRequest(
            page_size=2, page_token=first.next_page_token, filter=spb.TaskFilter(names=wanted)
        ),
        timeout=10,
    )
    assert [t.name for t in rest.tasks] == [made[4].name] and not rest.next_page_token
    both = spb.TaskFilter(names=wanted, tasks=["demo.sleep"])
    assert list(tasks.ListTasks(spb.ListTasksRequest(filter=both), timeout=10).tasks) == []
