"""The resumable watch's decisions (``WatchMachine``), message by message, without I/O."""

from __future__ import annotations

import grpc
import pytest

import tether
from tether import _watch
from tether.v1 import task_pb2, task_service_pb2

RUNNING = task_pb2.TASK_STATE_RUNNING
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
SNAPSHOT = task_service_pb2.TASK_EVENT_TYPE_SNAPSHOT
CHANGED = task_service_pb2.TASK_EVENT_TYPE_STATE_CHANGED
POLICY = tether.RetryPolicy(jitter=0)


def event(
    name: str,
    revision: int,
    *,
    state: task_pb2.TaskState.ValueType = RUNNING,
    kind: task_service_pb2.TaskEventType.ValueType = CHANGED,
    task_revision: int | None = None,
) -> task_service_pb2.StreamTaskStatusResponse:
    task = task_pb2.Task(name=name, state=state, revision=task_revision or revision)
    return task_service_pb2.StreamTaskStatusResponse(
        resume_token=f"tok-{revision}",
        task_event=task_service_pb2.TaskEvent(type=kind, task=task, revision=revision),
    )


def snapshot(
    name: str, revision: int, token: str = "tok-snap"
) -> task_service_pb2.StreamTaskStatusResponse:
    message = event(name, revision, kind=SNAPSHOT)
    message.resume_token = token
    return message


def checkpoint(
    revision: int, *, initial: bool = False
) -> task_service_pb2.StreamTaskStatusResponse:
    return task_service_pb2.StreamTaskStatusResponse(
        resume_token=f"cp-{revision}",
        checkpoint=task_service_pb2.StreamCheckpoint(
            revision=revision, initial_state_complete=initial
        ),
    )


def listing(
    *tasks: tuple[str, int], token: str, next_page: str = ""
) -> task_service_pb2.ListTasksResponse:
    return task_service_pb2.ListTasksResponse(
        tasks=[task_pb2.Task(name=name, revision=revision) for name, revision in tasks],
        next_page_token=next_page,
        resume_token=token,
    )


def delivered(
    machine: _watch.WatchMachine, *messages: task_service_pb2.StreamTaskStatusResponse
) -> list[tuple[str, int]]:
    items = [machine.on_message(message) for message in messages]
    return [(item.task.name, item.revision) for item in items if isinstance(item, tether.TaskEvent)]


UNAVAILABLE = tether.Unavailable("server restarting", code=grpc.StatusCode.UNAVAILABLE)
EXPIRED = tether.ResumeTokenExpired(
    "too old", code=grpc.StatusCode.OUT_OF_RANGE, reason="RESUME_TOKEN_EXPIRED"
)


def test_events_are_yielded_in_order_and_repeats_are_dropped() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    got = delivered(
        machine,
        event("tasks/a", 1),
        event("tasks/b", 2),
        event("tasks/a", 2),
        event("tasks/a", 1),
        event("tasks/a", 3),
    )
    assert got == [("tasks/a", 1), ("tasks/b", 2), ("tasks/a", 3)]
    assert machine.resume_token == "tok-3"


def test_checkpoints_advance_the_token_but_are_yielded_only_when_asked_for() -> None:
    quiet = _watch.WatchMachine(policy=POLICY)
    assert quiet.on_message(checkpoint(7)) is None
    assert quiet.resume_token == "cp-7"
    assert delivered(quiet, event("tasks/a", 6), event("tasks/a", 8)) == [("tasks/a", 8)]

    asking = _watch.WatchMachine(policy=POLICY, yield_checkpoints=True)
    item = asking.on_message(checkpoint(7))
    assert isinstance(item, tether.Checkpoint)
    assert (item.revision, item.resume_token) == (7, "cp-7")


def test_after_unavailable_the_stream_reopens_from_the_last_token_with_growing_backoff() -> None:
    machine = _watch.WatchMachine(policy=POLICY, resume_token="start")
    assert machine.stream_request().resume_token == "start"
    delivered(machine, event("tasks/a", 4))
    assert [machine.on_error(UNAVAILABLE) for _ in range(3)] == [
        _watch.Reconnect(0.1),
        _watch.Reconnect(0.2),
        _watch.Reconnect(0.4),
    ]
    assert machine.stream_request().resume_token == "tok-4"
    assert not machine.stream_request().send_initial_state


def test_a_message_resets_the_backoff() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    machine.on_error(UNAVAILABLE)
    machine.on_error(UNAVAILABLE)
    machine.on_message(checkpoint(1))
    assert machine.on_error(UNAVAILABLE) == _watch.Reconnect(0.1)


def test_the_backoff_is_capped_at_five_seconds() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    delays = [machine.on_error(UNAVAILABLE) for _ in range(10)]
    assert delays[-1] == _watch.Reconnect(5.0)


def test_a_lagging_subscriber_or_a_server_shutting_down_resumes_too() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    assert isinstance(machine.on_error(tether.SubscriberLagging("slow")), _watch.Reconnect)
    assert isinstance(machine.on_error(tether.ShuttingDown("bye")), _watch.Reconnect)


def test_a_filter_stream_that_ends_is_reopened() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    assert isinstance(machine.on_end(), _watch.Reconnect)


@pytest.mark.parametrize(
    "error",
    [
        tether.InvalidArgument("bad filter"),
        tether.PermissionDenied("no", code=grpc.StatusCode.PERMISSION_DENIED),
        tether.TetherError("boom", code=grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_other_than_unavailable_and_expiry_end_the_watch(error: tether.TetherError) -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    with pytest.raises(type(error)):
        machine.on_error(error)


def test_an_expired_token_makes_a_filter_watch_relist_and_continue_from_the_listing() -> None:
    task_filter = tether.TaskFilter(tasks=["demo.sleep"])
    machine = _watch.WatchMachine(policy=POLICY, task_filter=task_filter, resume_token="old")
    assert delivered(machine, event("tasks/a", 5)) == [("tasks/a", 5)]

    assert machine.on_error(EXPIRED) == _watch.Relist(0.1)
    request = machine.list_request("")
    assert list(request.filter.tasks) == ["demo.sleep"]
    first = machine.on_list_page(
        listing(("tasks/a", 5), ("tasks/b", 9), token="list-1", next_page="p2")
    )
    second = machine.on_list_page(listing(("tasks/c", 12), token="list-2"))
    assert machine.finish_relist() == _watch.Reconnect(0.0)

    # tasks/a at revision 5 was already delivered; b and c come as snapshots.
    snapshots = first + second
    assert [(e.type, e.task.name, e.revision) for e in snapshots] == [
        (tether.TaskEventType.SNAPSHOT, "tasks/b", 9),
        (tether.TaskEventType.SNAPSHOT, "tasks/c", 12),
    ]
    assert all(e.resume_token == "list-1" for e in snapshots)
    # The stream continues from the first page's token, not the last one.
    assert machine.stream_request().resume_token == "list-1"


def test_after_a_relist_replayed_events_the_snapshots_showed_are_dropped() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    machine.on_error(EXPIRED)
    machine.on_list_page(listing(("tasks/a", 10), ("tasks/b", 14), token="list-1"))
    machine.finish_relist()
    got = delivered(
        machine,
        event("tasks/a", 10),  # already in the snapshot of a
        event("tasks/c", 11),  # changed while b was being listed: new
        event("tasks/b", 14),  # already in the snapshot of b
        event("tasks/a", 15),
    )
    assert got == [("tasks/c", 11), ("tasks/a", 15)]


def test_a_failed_relist_is_retried_from_its_first_page() -> None:
    machine = _watch.WatchMachine(policy=POLICY)
    machine.on_error(EXPIRED)
    machine.on_list_page(listing(("tasks/a", 3), token="first", next_page="p2"))
    machine.abandon_relist()
    assert machine.on_relist_error(UNAVAILABLE) == _watch.Relist(0.2)
    again = machine.on_list_page(listing(("tasks/a", 3), ("tasks/b", 4), token="second"))
    machine.finish_relist()
    assert [e.task.name for e in again] == ["tasks/b"]  # a's snapshot was already yielded
    assert machine.stream_request().resume_token == "second"


def test_initial_state_snapshots_are_not_repeated_when_the_stream_breaks_before_they_end() -> None:
    machine = _watch.WatchMachine(policy=POLICY, send_initial_state=True)
    assert machine.stream_request().send_initial_state
    assert delivered(machine, snapshot("tasks/a", 7), snapshot("tasks/b", 3)) == [
        ("tasks/a", 7),
        ("tasks/b", 3),
    ]
    machine.on_error(UNAVAILABLE)
    request = machine.stream_request()
    assert request.send_initial_state and request.resume_token == ""
    got = delivered(
        machine,
        snapshot("tasks/a", 7),
        snapshot("tasks/b", 3),
        snapshot("tasks/c", 8),
        checkpoint(8, initial=True),
        event("tasks/a", 9),
    )
    assert got == [("tasks/c", 8), ("tasks/a", 9)]
    machine.on_error(UNAVAILABLE)
    request = machine.stream_request()
    assert not request.send_initial_state and request.resume_token == "tok-9"


def test_a_single_task_watch_finishes_after_the_terminal_event() -> None:
    machine = _watch.WatchMachine(policy=POLICY, name="abc", send_initial_state=True)
    assert machine.stream_request().name == "tasks/abc"
    delivered(machine, snapshot("tasks/abc", 2))
    assert not machine.finished
    assert delivered(machine, event("tasks/abc", 5, state=SUCCEEDED)) == [("tasks/abc", 5)]
    assert machine.finished
    assert machine.on_end() == _watch.Finished()


def test_a_single_task_stream_that_ends_early_is_reopened() -> None:
    machine = _watch.WatchMachine(policy=POLICY, name="abc")
    delivered(machine, event("tasks/abc", 2))
    assert isinstance(machine.on_end(), _watch.Reconnect)


def test_a_single_task_watch_with_an_expired_token_asks_for_the_current_state_again() -> None:
    machine = _watch.WatchMachine(policy=POLICY, name="abc", resume_token="old")
    delivered(machine, event("tasks/abc", 4))
    assert machine.on_error(EXPIRED) == _watch.Reconnect(0.1)
    request = machine.stream_request()
    assert request.send_initial_state and request.resume_token == ""
    # The snapshot repeats revision 4: dropped. A newer one is news.
    assert delivered(machine, snapshot("tasks/abc", 4)) == []
    assert delivered(machine, event("tasks/abc", 6)) == [("tasks/abc", 6)]


def test_a_watch_cannot_have_both_a_name_and_a_filter() -> None:
    with pytest.raises(ValueError):
        _watch.WatchMachine(policy=POLICY, name="a", task_filter=tether.TaskFilter())


def test_a_watch_with_a_deadline_gives_up_instead_of_waiting_past_it() -> None:
    import time

    machine = _watch.WatchMachine(policy=POLICY, name="a", deadline=time.monotonic() + 0.05)
    assert machine.stream_timeout() is not None
    with pytest.raises(tether.DeadlineExceeded):
        for _ in range(10):
            machine.on_error(UNAVAILABLE)
