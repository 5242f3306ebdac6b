"""The shared watch stream's routing (``SharedWatchBoard``), event by event, without I/O.

The last test plays the whole protocol against a simulated server log: watches join
and leave at random points, the stream is reopened from its last token after each
listing, consumers fall behind, and every watch must yield exactly what a
single-task stream opened when it joined would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

import tether
from tether import _convert, _shared_watch, _watch
from tether._models import Task, TaskEvent, TaskEventType, TaskState
from tether._shared_watch import Route, RouteState, SharedWatchBoard
from tether.v1 import task_pb2, task_service_pb2

CHANGED = TaskEventType.STATE_CHANGED
PROGRESS = TaskEventType.PROGRESS
OUTPUT = TaskEventType.OUTPUT
POLICY = tether.RetryPolicy(jitter=0)


def _task(name: str, revision: int, state: TaskState = TaskState.RUNNING) -> Task:
    message = task_pb2.Task(
        name=name, state=task_pb2.TaskState.ValueType(state.value), revision=revision
    )
    return _convert.task_from_proto(message)


def _event(
    name: str, revision: int, kind: TaskEventType = CHANGED, state: TaskState = TaskState.RUNNING
) -> TaskEvent:
    return TaskEvent(
        type=kind,
        task=_task(name, revision, state),
        event_time=None,
        output_chunk="x" if kind is OUTPUT else "",
        revision=revision,
        resume_token=f"tok-{revision}",
        raw=None,
    )


def _board(**kwargs: int) -> SharedWatchBoard[None]:
    return SharedWatchBoard(**kwargs)


def _revisions(route: Route[None]) -> list[int]:
    return [item.revision for item in route.items]


def _join(board: SharedWatchBoard[None], *tasks: Task, token: str = "tok-0") -> None:
    routes = board.joining()
    board.on_listed(routes, {task.name: task for task in tasks}, token)


def test_a_joining_watch_gets_its_snapshot_then_only_later_events() -> None:
    board = _board()
    route = board.add("tasks/a", None, exclude_progress=False)
    assert route.state is RouteState.LISTING and board.changed
    _join(board, _task("tasks/a", 4), token="tok-2")
    assert route.state is RouteState.LIVE and not board.changed
    assert (route.items[0].type, route.floor, route.token) == (TaskEventType.SNAPSHOT, 4, "tok-2")
    for revision in (3, 4, 5):  # a stream from tok-2 repeats what the snapshot shows
        board.on_event(_event("tasks/a", revision))
    board.on_event(_event("tasks/b", 6))
    assert _revisions(route) == [4, 5]
    assert route.token == "tok-5"


def test_a_watch_ends_with_its_terminal_event_and_leaves_without_a_reopen() -> None:
    board = _board()
    route = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1))
    board.on_event(_event("tasks/a", 2, state=TaskState.SUCCEEDED))
    board.on_event(_event("tasks/a", 3, TaskEventType.UPDATED, TaskState.SUCCEEDED))
    assert route.state is RouteState.ENDED and _revisions(route) == [1, 2]
    assert board.empty and not board.changed
    assert _shared_watch.settle(route) is RouteState.ENDED


def test_a_terminal_snapshot_ends_the_watch_at_once() -> None:
    board = _board()
    route = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 7, TaskState.FAILED))
    assert route.state is RouteState.ENDED and _revisions(route) == [7]
    assert board.shape() is None


def test_progress_is_left_out_per_watch_and_on_the_stream_only_when_all_leave_it_out() -> None:
    board = _board()
    quiet = board.add("tasks/a", None, exclude_progress=True)
    _join(board, _task("tasks/a", 1))
    shape = board.shape()
    assert shape is not None and shape.exclude_progress
    chatty = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1))
    shape = board.shape()
    assert shape is not None and not shape.exclude_progress
    assert list(shape.task_filter.names) == ["tasks/a"]
    board.on_event(_event("tasks/a", 2, PROGRESS))
    board.on_event(_event("tasks/a", 3, OUTPUT))
    board.on_event(_event("tasks/a", 4))
    assert _revisions(quiet) == [1, 4]
    assert _revisions(chatty) == [1, 2, 3, 4]


def test_a_second_watch_of_a_followed_task_ignores_events_before_its_snapshot() -> None:
    board = _board()
    first = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1))
    second = board.add("tasks/a", None, exclude_progress=False)
    board.on_event(_event("tasks/a", 2))  # read before the reopen: the listing will show it
    _join(board, _task("tasks/a", 2), token="tok-2")
    board.on_event(_event("tasks/a", 3))
    assert _revisions(first) == [1, 2, 3]
    assert _revisions(second) == [2, 3]


def test_closing_a_live_watch_asks_for_a_reopen_and_a_listing_one_does_not() -> None:
    board = _board()
    live = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1))
    listing = board.add("tasks/b", None, exclude_progress=False)
    board.joining()
    board.remove(listing)
    assert not board.changed and listing.state is RouteState.CLOSED
    board.remove(live)
    assert board.changed and board.empty and live.state is RouteState.CLOSED
    board.on_event(_event("tasks/a", 2))
    assert _revisions(live) == [1]


def test_a_watch_that_falls_behind_detaches_where_its_queue_ends() -> None:
    board = _board(queue_limit=2)
    slow = board.add("tasks/a", None, exclude_progress=False)
    other = board.add("tasks/b", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1), _task("tasks/b", 2))
    board.on_event(_event("tasks/a", 3))
    woken = board.on_event(_event("tasks/a", 4))  # the third item: over the limit
    assert woken == [slow] and slow.state is RouteState.DETACHED and board.changed
    assert (_revisions(slow), slow.floor, slow.token) == ([1, 3], 3, "tok-3")
    board.on_event(_event("tasks/b", 5))
    assert _revisions(other) == [2, 5]
    shape = board.shape()
    assert shape is not None and list(shape.task_filter.names) == ["tasks/b"]
    # Its own stream resumes strictly after its last queued event, repeating nothing.
    machine = _watch.WatchMachine(policy=POLICY, name="tasks/a", send_initial_state=True)
    machine.resume_after(slow.token, slow.floor)
    request = machine.stream_request()
    assert (request.name, request.resume_token, request.send_initial_state) == (
        "tasks/a",
        "tok-3",
        False,
    )


def test_a_full_stream_starts_new_watches_detached_on_streams_of_their_own() -> None:
    board = _board(max_names=2)
    board.add("tasks/a", None, exclude_progress=False)
    board.add("tasks/b", None, exclude_progress=False)
    same_task = board.add("tasks/b", None, exclude_progress=False)
    board.changed = False
    overflow = board.add("tasks/c", None, exclude_progress=False)
    assert same_task.state is RouteState.LISTING
    assert overflow.state is RouteState.DETACHED and not overflow.token and not board.changed


def test_unlisted_watches_are_handed_back_and_fail_alone() -> None:
    board = _board()
    known = board.add("tasks/a", None, exclude_progress=False)
    unknown = board.add("tasks/nope", None, exclude_progress=False)
    woken, unlisted = board.on_listed(board.joining(), {"tasks/a": _task("tasks/a", 1)}, "t")
    assert woken == [known] and unlisted == [unknown]
    error = tether.TaskNotFound("no such task")
    board.fail(unknown, error)
    assert unknown.state is RouteState.FAILED
    try:
        _shared_watch.settle(unknown)
    except tether.TaskNotFound as raised:
        assert raised is error
    else:
        raise AssertionError("settle did not raise the route's error")
    assert board.fail_all(error) == [known] and board.empty


def test_an_abandoned_watch_is_let_go_at_its_next_event() -> None:
    board = _board()
    route = board.add("tasks/a", None, exclude_progress=False)
    _join(board, _task("tasks/a", 1))
    _shared_watch.abandon(route)
    assert board.on_event(_event("tasks/a", 2)) == []
    assert board.empty and board.changed and route.state is RouteState.CLOSED


def test_a_join_lists_every_joining_task_at_once_and_reopens_from_the_streams_token() -> None:
    board = _board()
    a = board.add("tasks/a", None, exclude_progress=False)
    b = board.add("tasks/b", None, exclude_progress=False)
    join = _shared_watch.Join(board, board.joining(), "stream-token")
    request = join.next_call()
    assert isinstance(request, task_service_pb2.ListTasksRequest)
    assert list(request.filter.names) == ["tasks/a", "tasks/b"]
    assert request.view == task_pb2.TASK_VIEW_BASIC
    page = task_service_pb2.ListTasksResponse(
        tasks=[task_pb2.Task(name="tasks/a", revision=2)], resume_token="list-token"
    )
    assert join.on_answer(page) == [a]
    assert a.items[0].resume_token == "stream-token"  # the stream's token, not the listing's
    assert join.next_call() == "tasks/b"  # not listed: looked up alone
    assert join.on_error(tether.TaskNotFound("no such task")) == [b]
    assert b.state is RouteState.FAILED and join.next_call() is None


def test_a_refused_listing_looks_each_task_up_alone_from_a_fresh_token() -> None:
    board = _board()
    good = board.add("tasks/good", None, exclude_progress=False)
    bad = board.add("tasks/bad name", None, exclude_progress=False)
    join = _shared_watch.Join(board, board.joining(), None)  # no stream yet: no token
    assert isinstance(join.next_call(), task_service_pb2.ListTasksRequest)
    assert join.on_error(tether.InvalidArgument("filter.names[0]: not a task name")) == []
    token_request = join.next_call()
    assert isinstance(token_request, task_service_pb2.ListTasksRequest)
    assert token_request.page_size == 1 and not token_request.filter.names
    join.on_answer(task_service_pb2.ListTasksResponse(resume_token="fresh"))
    assert join.resume_token == "fresh"
    assert join.next_call() == "tasks/good"
    assert join.on_answer(_task("tasks/good", 3)) == [good]
    assert join.next_call() == "tasks/bad name"
    join.on_error(tether.InvalidArgument("name: not a task name"))
    assert (good.state, bad.state) == (RouteState.LIVE, RouteState.FAILED)
    assert join.next_call() is None


def test_a_join_of_no_route_calls_nothing() -> None:
    # An empty names filter would list every task on the server.
    assert _shared_watch.Join(_board(), [], "t").next_call() is None


# --------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Logged:
    """One event of the simulated server log (revision = position + 1)."""

    name: str
    kind: TaskEventType
    state: TaskState


def _log(choices: list[tuple[int, int]]) -> list[Logged]:
    """A log of two tasks: each is submitted, reports progress and output, and ends."""
    log: list[Logged] = []
    steps = {name: 0 for name in ("tasks/a", "tasks/b")}
    for which, kind in choices:
        name = sorted(steps)[which]
        step = steps[name]
        if step < 0:
            continue  # ended
        if step == 0:
            log.append(Logged(name, CHANGED, TaskState.PENDING))
        elif kind == 0 and step > 4:
            log.append(Logged(name, CHANGED, TaskState.SUCCEEDED))
            steps[name] = -1
            continue
        else:
            log.append(Logged(name, (PROGRESS, OUTPUT, CHANGED)[kind % 3], TaskState.RUNNING))
        steps[name] = step + 1
    return log


def _as_event(log: list[Logged], position: int) -> TaskEvent:
    entry = log[position]
    return _event(entry.name, position + 1, entry.kind, entry.state)


def _snapshot(log: list[Logged], name: str, head: int) -> Task | None:
    """The task ``name`` as the server shows it when ``head`` events exist."""
    for position in range(head - 1, -1, -1):
        if log[position].name == name:
            return _task(name, position + 1, log[position].state)
    return None


def _single_task_stream(
    log: list[Logged], name: str, head: int, exclude_progress: bool
) -> list[tuple[TaskEventType, int]]:
    """What a single-task watch opened when ``head`` events existed yields."""
    snapshot = _snapshot(log, name, head)
    assert snapshot is not None
    items = [(TaskEventType.SNAPSHOT, snapshot.revision)]
    if snapshot.state.is_terminal:
        return items
    for position in range(head, len(log)):
        entry = log[position]
        if entry.name != name or (exclude_progress and entry.kind in (PROGRESS, OUTPUT)):
            continue
        items.append((entry.kind, position + 1))
        if entry.state.is_terminal:
            break
    return items


@dataclass
class Watcher:
    route: Route[None]
    joined_at: int = -1
    """Server head when its listing ran."""
    got: tuple[tuple[TaskEventType, int], ...] = ()
    closed: bool = False
    own_from: int | None = None
    """Set once detached and drained: the position its own stream resumes after."""


ACTIONS = (0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5)
"""Server advances, stream reads, joins, consumer reads, closes, reopens: weighted."""


@settings(max_examples=300, deadline=None)
@given(
    choices=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=20, max_size=60),
    script=st.lists(
        st.tuples(st.sampled_from(ACTIONS), st.integers(0, 2), st.booleans()),
        min_size=30,
        max_size=120,
    ),
    queue_limit=st.integers(1, 6),
)
def test_every_watch_yields_what_a_single_task_stream_opened_when_it_joined_would(
    choices: list[tuple[int, int]], script: list[tuple[int, int, bool]], queue_limit: int
) -> None:
    log = _log(choices)
    board = _board(queue_limit=queue_limit)
    watchers: list[Watcher] = []
    head = 0  # events the server has
    position = 0  # events the shared stream has handed to the board (its token)
    names: set[str] = set()  # what the open stream carries

    def reopen() -> None:
        nonlocal names
        routes = board.joining()
        listed = {r.name: t for r in routes if (t := _snapshot(log, r.name, head)) is not None}
        board.on_listed(routes, listed, f"tok-{position}")
        for watcher in watchers:
            if watcher.route in routes:
                watcher.joined_at = head
        shape = board.shape()
        names = set(shape.task_filter.names) if shape is not None else set()

    def consume(watcher: Watcher, count: int) -> None:
        route = watcher.route
        for _ in range(count):
            if route.items:
                item = route.items.popleft()
                watcher.got += ((item.type, item.revision),)
            elif route.state is RouteState.DETACHED and watcher.own_from is None:
                watcher.own_from = int(route.token.removeprefix("tok-"))

    def read() -> None:
        # The stream goes on after a change until the driver gets round to reopening it.
        nonlocal position, head
        head = max(head, min(position + 1, len(log)))  # the server goes on meanwhile
        if position < head:
            event = _as_event(log, position)
            position += 1
            if event.task.name in names:
                board.on_event(event)
            assert all(len(w.route.items) <= queue_limit for w in watchers)

    for action, which, flag in script:
        if action == 0 and head < len(log):
            head += 1
        elif action == 1:
            read()
        elif action == 2:
            existing = sorted({e.name for e in log[:head]})
            if existing:
                route = board.add(existing[which % len(existing)], None, exclude_progress=flag)
                watchers.append(Watcher(route))
        elif action == 3 and watchers:
            consume(watchers[which % len(watchers)], 1 + which)
        elif action == 4 and watchers and flag:
            watcher = watchers[which % len(watchers)]
            if watcher.route.on_board and watcher.route.state is RouteState.LIVE:
                board.remove(watcher.route)
                watcher.closed = True
        elif action == 5:
            reopen()
    head = len(log)
    while position < head or board.changed:
        read()
        read()
        if board.changed:
            reopen()
    for watcher in watchers:
        if watcher.closed:
            continue
        consume(watcher, 10_000)
        route = watcher.route
        if route.state is RouteState.DETACHED and watcher.joined_at < 0:
            continue  # started detached (the board was full): a stream of its own from scratch
        expected = _single_task_stream(log, route.name, watcher.joined_at, route.exclude_progress)
        got = list(watcher.got)
        if watcher.own_from is not None:  # its own stream: strictly after its last queued event
            for later in range(watcher.own_from, len(log)):
                entry = log[later]
                if entry.name != route.name or later + 1 <= route.floor:
                    continue
                if route.exclude_progress and entry.kind in (PROGRESS, OUTPUT):
                    continue
                got.append((entry.kind, later + 1))
                if entry.state.is_terminal:
                    break
        assert got == expected, (route.name, route.state)
