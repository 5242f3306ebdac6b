"""Handle watches of one client share one stream and yield what single-task streams yield.

Real server, real cluster (two engines). Each test reads every task's history with a
single-task ``StreamTaskStatus`` resumed from a token taken before its submit, and
checks that a handle's watch yielded a SNAPSHOT of the task as it was, then exactly
the history after it. The module runs its own server because one test restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

import tether
from tests.support import ServerProcess, serve_for_tests, wait_until
from tether._shared_watch import SharedWatchBoard
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

WAIT = 90.0
Shape = tuple[str, int, str, str]
"""(event type, revision, task state, output chunk): what must match."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_for_tests(tmp_path_factory, "handle-watches")


@pytest.fixture(scope="module")
def setup(server: ServerProcess) -> Iterator[tether.Client]:
    """Submits and interrupts; the clients under test only watch."""
    with tether.Client(server.address) as client:
        yield client


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[task_service_pb2_grpc.TaskServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield task_service_pb2_grpc.TaskServiceStub(channel)


def token_now(stub: task_service_pb2_grpc.TaskServiceStub) -> str:
    """A resume token for "now" (ListTasks takes it before it lists)."""
    return stub.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10).resume_token


def history(stub: task_service_pb2_grpc.TaskServiceStub, name: str, token: str) -> list[Shape]:
    """Every event of task ``name`` after ``token``, by its own single-task stream."""
    request = spb.StreamTaskStatusRequest(name=name, resume_token=token)
    return [
        (
            tether.TaskEventType(r.task_event.type).name,
            r.task_event.revision,
            tether.TaskState(r.task_event.task.state).name,
            r.task_event.output_chunk,
        )
        for r in stub.StreamTaskStatus(request, timeout=WAIT)
        if r.HasField("task_event")
    ]


def shape(event: tether.TaskEvent) -> Shape:
    return (event.type.name, event.revision, event.task.state.name, event.output_chunk)


def assert_single_task_stream(
    watched: list[tether.TaskEvent], full: list[Shape], *, exclude_progress: bool = False
) -> None:
    """``watched`` is what a single-task watch opened at its SNAPSHOT's moment yields."""
    snapshot, *later = watched
    assert snapshot.type is tether.TaskEventType.SNAPSHOT
    before = [e for e in full if e[1] <= snapshot.revision]
    assert before and before[-1][1] == snapshot.revision  # the task as it was then
    assert before[-1][2] == snapshot.task.state.name
    expected = [e for e in full if e[1] > snapshot.revision]
    if exclude_progress:
        expected = [e for e in expected if e[0] not in ("PROGRESS", "OUTPUT")]
    if snapshot.task.state.is_terminal:
        expected = []
    assert [shape(e) for e in later] == expected


@dataclass
class StreamCounter:
    """Wraps a client's ``_open_stream``: how many shared / single-task streams it opened."""

    open_shared: int = 0
    most_shared_at_once: int = 0
    shared_requests: list[spb.StreamTaskStatusRequest] = field(default_factory=list)
    single_task: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, client: tether.Client | tether.AsyncClient) -> None:
        open_stream = client._open_stream
        counted = _AsyncCountedCall if isinstance(client, tether.AsyncClient) else _CountedCall

        def counting(machine: Any) -> Any:
            request = machine.stream_request()
            call = open_stream(machine)
            if request.name:
                with self.lock:
                    self.single_task.append(request.name)
                return call
            if not request.filter.names:
                return call  # the outcome stream (results), not under test here
            self.opened(request)
            return counted(call, self)

        client._open_stream = counting  # type: ignore[method-assign]

    def opened(self, request: spb.StreamTaskStatusRequest) -> None:
        with self.lock:
            self.shared_requests.append(request)
            self.open_shared += 1
            self.most_shared_at_once = max(self.most_shared_at_once, self.open_shared)

    def closed(self) -> None:
        with self.lock:
            self.open_shared -= 1

    def last_names(self) -> set[str]:
        with self.lock:
            return set(self.shared_requests[-1].filter.names) if self.shared_requests else set()


class _CountedCall:
    """A blocking stream call that tells its counter when it ends, however it ends."""

    def __init__(self, call: Any, counter: StreamCounter) -> None:
        self._call = call
        self._counter: StreamCounter | None = counter

    def _end(self) -> None:
        counter, self._counter = self._counter, None
        if counter is not None:
            counter.closed()

    def __iter__(self) -> _CountedCall:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except BaseException:
            self._end()
            raise

    def cancel(self) -> bool:
        self._end()
        return bool(self._call.cancel())


class _AsyncCountedCall(_CountedCall):
    """The same for a ``grpc.aio`` call (anything else goes to the call itself)."""

    def __aiter__(self) -> _AsyncCountedCall:
        self._messages = self._call.__aiter__()
        return self

    async def __anext__(self) -> Any:
        try:
            return await anext(self._messages)
        except BaseException:
            self._end()
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class Collector:
    """Iterates one watch on a thread of its own, keeping every event."""

    def __init__(self, watch: tether.TaskWatch[tether.TaskEvent]) -> None:
        self.watch = watch
        self.events: list[tether.TaskEvent] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.events.append(event)
        except BaseException as exc:  # the test inspects it
            self.error = exc

    def finish(self) -> list[tether.TaskEvent]:
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the watch did not end"
        assert self.error is None, self.error
        return self.events


@contextlib.contextmanager
def busy_engines(setup: tether.Client) -> Iterator[None]:
    """Both engines run a long task meanwhile: tasks submitted now stay PENDING."""
    blockers = [setup.submit("demo.sleep", {"seconds": 120}, priority=10) for _ in range(2)]
    try:
        for blocker in blockers:
            wait_until(lambda b=blocker: b.refresh().state is tether.TaskState.RUNNING)
        yield
    finally:
        for blocker in blockers:
            with contextlib.suppress(tether.TaskAlreadyTerminal):
                blocker.interrupt("the test goes on")


def counts(setup: tether.Client, n: int, times: int = 1) -> list[str]:
    """Submits ``times`` demo.count tasks of ``n`` steps of 20 ms; returns their names."""
    return [setup.submit("demo.count", {"n": n, "interval": 0.02}).name for _ in range(times)]


@dataclass
class Watching:
    """A client under test, the streams it opens, and a token from before the test's tasks."""

    client: tether.Client
    streams: StreamCounter
    token: str

    def assert_one_shared_stream(self) -> None:
        """Never more than one shared stream at once, and no stream of a handle's own."""
        assert self.streams.most_shared_at_once == 1
        assert self.streams.single_task == []


@pytest.fixture
def watching(
    server: ServerProcess, stub: task_service_pb2_grpc.TaskServiceStub
) -> Iterator[Watching]:
    token = token_now(stub)
    streams = StreamCounter()
    with tether.Client(server.address) as client:
        streams.install(client)
        yield Watching(client, streams, token)


# --------------------------------------------------------------------------- one stream


def test_twenty_handles_watched_at_once_share_one_stream_each_seeing_its_own_events(
    watching: Watching, setup: tether.Client, stub: task_service_pb2_grpc.TaskServiceStub
) -> None:
    with busy_engines(setup):
        names = counts(setup, 3, times=20)
        collectors = [Collector(watching.client.get_handle(name).watch()) for name in names]
        wait_until(lambda: all(c.events for c in collectors))  # every snapshot is in
        wait_until(lambda: watching.streams.last_names() == set(names))  # all on one stream
    watched = [collector.finish() for collector in collectors]
    wait_until(lambda: watching.streams.open_shared == 0)  # the last watch ended: it closes
    watching.assert_one_shared_stream()
    for name, events in zip(names, watched, strict=True):
        assert events[0].task.state is tether.TaskState.PENDING
        assert events[-1].task.state is tether.TaskState.SUCCEEDED
        assert_single_task_stream(events, history(stub, name, watching.token))


def test_async_handles_watched_at_once_share_one_stream_each_seeing_its_own_events(
    server: ServerProcess, setup: tether.Client, stub: task_service_pb2_grpc.TaskServiceStub
) -> None:
    token = token_now(stub)
    names: list[str] = []

    counter = StreamCounter()

    async def scenario() -> list[list[tether.TaskEvent]]:
        async with tether.AsyncClient(server.address) as watcher:
            counter.install(watcher)

            async def watch(name: str) -> list[tether.TaskEvent]:
                return [event async for event in watcher.get_handle(name).watch()]

            with busy_engines(setup):
                names.extend(counts(setup, 3, times=20))
                watches = [asyncio.ensure_future(watch(name)) for name in names]
                while counter.last_names() != set(names):  # all on one stream
                    await asyncio.sleep(0.05)
            watched = list(await asyncio.gather(*watches))
            while counter.open_shared:  # the last watch ended: the stream closes
                await asyncio.sleep(0.05)
            return watched

    watched = asyncio.run(asyncio.wait_for(scenario(), timeout=WAIT))
    assert counter.most_shared_at_once == 1
    assert counter.single_task == []
    for name, events in zip(names, watched, strict=True):
        assert events[-1].task.state is tether.TaskState.SUCCEEDED
        assert_single_task_stream(events, history(stub, name, token))


# --------------------------------------------------------------------------- joining, leaving


def test_watches_joining_and_leaving_mid_stream_lose_and_repeat_nothing(
    watching: Watching, setup: tether.Client, stub: task_service_pb2_grpc.TaskServiceStub
) -> None:
    long_a, long_b = counts(setup, 60, times=2)
    first = Collector(watching.client.get_handle(long_a).watch())
    leaving = Collector(watching.client.get_handle(long_b).watch())

    def outputs(collector: Collector) -> int:
        return sum(1 for e in collector.events if e.type is tether.TaskEventType.OUTPUT)

    wait_until(lambda: outputs(first) >= 5 and leaving.events)
    leaving.watch.close()  # mid-stream: the stream reopens without long_b
    leaving.finish()
    wait_until(lambda: watching.streams.last_names() == {long_a})
    second = Collector(watching.client.get_handle(long_a).watch())  # another watch of long_a
    wait_until(lambda: outputs(second) >= 3)
    (late,) = counts(setup, 5)
    third = Collector(watching.client.get_handle(late).watch())  # and a task of its own
    for collector, name in ((first, long_a), (second, long_a), (third, late)):
        assert_single_task_stream(collector.finish(), history(stub, name, watching.token))
    watching.assert_one_shared_stream()
    assert len(watching.streams.shared_requests) >= 3  # it reopened as watches came and went
    snapshot, *seen = leaving.events
    later = [e for e in history(stub, long_b, watching.token) if e[1] > snapshot.revision]
    assert [shape(e) for e in seen] == later[: len(seen)]


def test_each_handle_watch_keeps_its_own_exclude_progress(
    watching: Watching, setup: tether.Client, stub: task_service_pb2_grpc.TaskServiceStub
) -> None:
    with busy_engines(setup):
        (name,) = counts(setup, 4)
        handle = watching.client.get_handle(name)
        quiet = Collector(handle.watch(exclude_progress=True))
        chatty = Collector(handle.watch())
        wait_until(lambda: quiet.events and chatty.events)
        wait_until(lambda: watching.streams.last_names() == {name})
    full = history(stub, name, watching.token)
    assert_single_task_stream(quiet.finish(), full, exclude_progress=True)
    assert_single_task_stream(chatty.finish(), full)
    assert not watching.streams.shared_requests[-1].exclude_progress
    assert {e.type for e in quiet.events[1:]} <= {tether.TaskEventType.STATE_CHANGED}


# --------------------------------------------------------------------------- backpressure


def test_a_slow_watch_leaves_the_shared_stream_without_holding_the_others_or_losing_events(
    watching: Watching, setup: tether.Client, stub: task_service_pb2_grpc.TaskServiceStub
) -> None:
    watching.client._watches._board = SharedWatchBoard(queue_limit=3)
    (slow_name,) = counts(setup, 12)
    slow = watching.client.get_handle(slow_name).watch()
    first = next(slow)  # then nobody reads it for a while
    (quick_name,) = counts(setup, 3)
    quick = Collector(watching.client.get_handle(quick_name).watch())
    assert_single_task_stream(quick.finish(), history(stub, quick_name, watching.token))
    wait_until(lambda: setup.get(slow_name).state.is_terminal)
    slow_events = [first, *slow]
    assert watching.streams.single_task == [slow_name]  # it went on over a stream of its own
    assert watching.streams.most_shared_at_once == 1
    assert_single_task_stream(slow_events, history(stub, slow_name, watching.token))


# --------------------------------------------------------------------------- failures


def test_a_handle_watch_of_an_unknown_task_raises_task_not_found(server: ServerProcess) -> None:
    with tether.Client(server.address) as watcher, pytest.raises(tether.TaskNotFound):
        next(watcher.get_handle("does-not-exist").watch())


def test_a_names_filter_is_refused_when_a_name_is_malformed(setup: tether.Client) -> None:
    with pytest.raises(tether.InvalidArgument) as caught:
        next(iter(setup.list(tether.TaskFilter(names=["tasks/ok", "no-prefix"]))))
    assert caught.value.reason == "INVALID_FILTER"
    assert [v.field for v in caught.value.violations] == ["filter.names[1]"]


def test_handle_watches_survive_a_server_restart_losing_and_repeating_nothing(
    server: ServerProcess,
    watching: Watching,
    setup: tether.Client,
    stub: task_service_pb2_grpc.TaskServiceStub,
) -> None:
    names = counts(setup, 200, times=4)
    collectors = [Collector(watching.client.get_handle(name).watch()) for name in names]
    wait_until(lambda: watching.streams.last_names() == set(names))
    wait_until(lambda: sum(len(c.events) for c in collectors) >= 10)
    server.stop(timeout=15)
    server.start(timeout=60)
    # The running ones ended FAILED (CONTROLLER_RESTARTED); the others run now.
    for name in names:
        wait_until(lambda n=name: setup.get(n).state.is_terminal, timeout=120)
    watched = [collector.finish() for collector in collectors]
    watching.assert_one_shared_stream()
    assert len(watching.streams.shared_requests) >= 2  # resumed after the restart
    for name, events in zip(names, watched, strict=True):
        assert events[-1].task.state.is_terminal
        assert_single_task_stream(events, history(stub, name, watching.token))
