"""Subscriber fan-out: the index delivers each event to exactly the subscriptions that want it."""

from __future__ import annotations

from tether_server.core.eventlog import LogEntry
from tether_server.core.filters import TaskFilter
from tether_server.core.messages import EventKind
from tether_server.core.model import Task, TaskState
from tether_server.subscriptions import StreamOptions, SubscriberIndex, Subscription


def _sub(
    task_id: str | None = None, flt: TaskFilter | None = None, exclude_progress: bool = False
) -> Subscription:
    return Subscription(
        StreamOptions(task_id, flt or TaskFilter(), exclude_progress, False), 10, []
    )


def _entry(revision: int, task: Task, kind: EventKind = EventKind.STATE_CHANGED) -> LogEntry:
    return LogEntry(revision, kind, task, 0.0)


def _queued(sub: Subscription) -> list[int]:
    return [e.revision for e in sub._queue]


def test_index_delivers_by_task_id_filter_and_progress_preference() -> None:
    a = Task("a", "demo.echo", {}, labels={"team": "x"})
    b = Task("b", "demo.sleep", {}, labels={"team": "y"}, state=TaskState.RUNNING)
    only_a = _sub("a")
    team_x = _sub(flt=TaskFilter(labels={"team": "x"}))
    team_x_too = _sub(flt=TaskFilter(labels={"team": "x"}))
    sleeps_no_progress = _sub(
        flt=TaskFilter(tasks=frozenset({"demo.sleep"})), exclude_progress=True
    )
    everything = _sub()
    index = SubscriberIndex()
    for sub in (only_a, team_x, team_x_too, sleeps_no_progress, everything):
        index.add(sub)
    index.deliver(_entry(1, a))
    index.deliver(_entry(2, b))
    index.deliver(_entry(3, b, EventKind.OUTPUT))
    assert _queued(only_a) == [1]
    assert _queued(team_x) == _queued(team_x_too) == [1]
    assert _queued(sleeps_no_progress) == [2]
    assert _queued(everything) == [1, 2, 3]


def test_discarded_subscriptions_get_nothing_and_empty_groups_go_away() -> None:
    index = SubscriberIndex()
    one, two = _sub("a"), _sub(flt=TaskFilter(labels={"k": "v"}))
    index.add(one)
    index.add(two)
    index.discard(one)
    index.discard(two)
    index.discard(two)
    index.deliver(_entry(1, Task("a", "demo.echo", {}, labels={"k": "v"})))
    assert len(index) == 0
    assert _queued(one) == _queued(two) == []
    assert not index._by_task and not index._by_filter


def test_filters_on_names_get_every_event_of_their_tasks_and_nothing_else() -> None:
    a = Task("a", "demo.echo", {})
    b = Task("b", "demo.echo", {}, state=TaskState.SUCCEEDED)
    c = Task("c", "demo.echo", {})
    a_and_b = _sub(flt=TaskFilter(ids=frozenset({"a", "b"})))
    a_and_b_too = _sub(flt=TaskFilter(ids=frozenset({"b", "a"})))
    b_quiet = _sub(flt=TaskFilter(ids=frozenset({"b"})), exclude_progress=True)
    running_a = _sub(flt=TaskFilter(ids=frozenset({"a"}), states=frozenset({TaskState.RUNNING})))
    index = SubscriberIndex()
    for sub in (a_and_b, a_and_b_too, b_quiet, running_a):
        index.add(sub)
    index.deliver(_entry(1, a))
    index.deliver(_entry(2, b))
    index.deliver(_entry(3, b, EventKind.OUTPUT))
    index.deliver(_entry(4, c))
    assert _queued(a_and_b) == _queued(a_and_b_too) == [1, 2, 3]
    assert _queued(b_quiet) == [2]
    assert _queued(running_a) == []
    for sub in (a_and_b, a_and_b_too, b_quiet, running_a):
        index.discard(sub)
    assert not index._by_names and not index._named


def test_index_counts_open_subscriptions_per_principal() -> None:
    index = SubscriberIndex()
    a1, a2 = (
        Subscription(StreamOptions(None, TaskFilter(), False, False), 10, [], "alice")
        for _ in range(2)
    )
    b1 = Subscription(StreamOptions("t", TaskFilter(), False, False), 10, [], "bob")
    for sub in (a1, a2, b1, a1):
        index.add(sub)
    assert (index.count_of("alice"), index.count_of("bob"), index.count_of("carol")) == (2, 1, 0)
    index.discard(a1)
    index.discard(b1)
    assert (index.count_of("alice"), index.count_of("bob")) == (1, 0)
