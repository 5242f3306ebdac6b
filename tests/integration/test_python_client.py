"""The typed Python client (``tether.Client`` and ``tether.AsyncClient``) against a real server.

The module runs its own tether-server (a real embedded ipyparallel cluster with
two engines) because two of its tests restart it in the middle of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tests.support import ServerProcess, serve_for_tests, wait_until

WAIT = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_for_tests(tmp_path_factory, "python-client")


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[tether.Client]:
    with tether.Client(server.address) as client:
        yield client


def label() -> dict[str, str]:
    """A label unique to one test, so that lists and watches see only its tasks."""
    return {"run": uuid.uuid4().hex[:12]}


def wait_running(handle: tether.TaskHandle) -> None:
    for event in handle.watch():
        if event.task.state is tether.TaskState.RUNNING:
            return
    raise AssertionError(f"{handle.name} ended before it ran")


# --------------------------------------------------------------------------- tasks


def test_submit_and_result_round_trip_json(client: tether.Client) -> None:
    value = {"text": "hi", "n": 20, "xs": [1, 2.5, None, True]}
    handle = client.submit("demo.echo", {"value": value})
    assert handle.name.startswith("tasks/")
    assert handle.submitted is not None and handle.submitted.task == "demo.echo"
    assert handle.result(timeout=WAIT) == value


def test_interrupting_a_sleeping_task_makes_result_raise_task_interrupted(
    client: tether.Client,
) -> None:
    handle = client.submit("demo.sleep", {"seconds": 60})
    wait_running(handle)
    after = handle.interrupt("enough", grace=2)
    assert after.state in {tether.TaskState.INTERRUPTING, tether.TaskState.INTERRUPTED}
    with pytest.raises(tether.TaskInterrupted) as caught:
        handle.result(timeout=WAIT)
    task = caught.value.task
    assert task.state is tether.TaskState.INTERRUPTED
    assert task.interrupt is not None
    assert task.interrupt.reason == "enough"
    assert task.interrupt.final_stage is tether.EscalationStage.SIGINT
    assert task.error is not None and task.error.reason == "INTERRUPTED"


def test_interrupting_a_task_that_cannot_start_cancels_it(client: tether.Client) -> None:
    # Both engines busy: two echoes wait queued behind them (pipelined dispatch), one in
    # the server's queue; each interrupt cancels it, wherever it waits.
    blockers = [client.submit("demo.sleep", {"seconds": 60}, priority=10) for _ in range(2)]
    try:
        for blocker in blockers:
            wait_running(blocker)
        waiting = [client.submit("demo.echo", {"value": n}) for n in range(3)]
        for handle in waiting:
            assert client.interrupt(handle.id).state is tether.TaskState.CANCELLED
            with pytest.raises(tether.TaskCancelled):
                handle.result(timeout=WAIT)
    finally:
        for blocker in blockers:
            with contextlib.suppress(tether.TaskAlreadyTerminal):
                blocker.interrupt("the test is over")


def test_a_raising_task_makes_result_raise_task_failed_with_the_traceback(
    client: tether.Client,
) -> None:
    handle = client.submit("demo.fail", {"message": "boom"})
    with pytest.raises(tether.TaskFailed) as caught:
        handle.result(timeout=WAIT)
    error = caught.value.task.error
    assert error is not None
    assert (error.reason, error.type, error.message) == ("TASK_RAISED", "RuntimeError", "boom")
    assert "RuntimeError" in error.traceback
    assert caught.value.reason == "TASK_RAISED"


def test_a_task_past_its_timeout_makes_result_raise_task_timed_out(client: tether.Client) -> None:
    handle = client.submit("demo.sleep", {"seconds": 60}, timeout=0.5)
    with pytest.raises(tether.TaskTimedOut):
        handle.result(timeout=WAIT)


def test_result_stops_waiting_at_its_timeout_and_the_task_goes_on(client: tether.Client) -> None:
    handle = client.submit("demo.sleep", {"seconds": 60})
    started = time.monotonic()
    with pytest.raises(tether.DeadlineExceeded):
        handle.result(timeout=0.5)
    assert time.monotonic() - started < 5
    assert not handle.refresh().state.is_terminal
    handle.interrupt("cleanup")


def test_a_handle_watch_shows_progress_and_output_then_ends(client: tether.Client) -> None:
    handle = client.submit("demo.count", {"n": 4, "interval": 0.05})
    events = list(handle.watch())
    final = events[-1].task
    assert final.state is tether.TaskState.SUCCEEDED
    assert final.output == "".join(f"step {i}\n" for i in range(1, 5))
    # The chunks stream in order. (The server may end the task before the very last
    # chunk's event goes out; the final task's output always holds all of it.)
    chunks = "".join(e.output_chunk for e in events if e.type is tether.TaskEventType.OUTPUT)
    assert chunks.startswith("step 1\nstep 2\n") and final.output.startswith(chunks)
    progress = [e.task.progress for e in events if e.type is tether.TaskEventType.PROGRESS]
    fractions = [p.fraction for p in progress if p is not None]
    assert fractions[:2] == [0.25, 0.5] and fractions == sorted(fractions)
    revisions = [e.revision for e in events if e.type is not tether.TaskEventType.SNAPSHOT]
    assert revisions == sorted(set(revisions))


def test_get_accepts_bare_ids_and_full_names(client: tether.Client) -> None:
    handle = client.submit("demo.echo", {"value": "x"})
    handle.result(timeout=WAIT)
    by_id, by_name = client.get(handle.id), client.get(handle.name)
    assert by_id.name == by_name.name == handle.name
    assert by_id.result == "x"


def test_list_walks_every_page_in_submission_order(client: tether.Client) -> None:
    labels = label()
    names = [client.submit("demo.echo", {"value": i}, labels=labels).name for i in range(7)]
    listed = list(client.list(tether.TaskFilter(labels=labels), page_size=3))
    assert [task.name for task in listed] == names
    only_echo = tether.TaskFilter(labels=labels, tasks=["demo.sleep"])
    assert list(client.list(only_echo)) == []


def test_the_cluster_lists_its_engines_and_registered_tasks(client: tether.Client) -> None:
    cluster = client.cluster()
    assert len([e for e in cluster.engines if e.state is not tether.EngineState.LOST]) >= 2
    assert cluster.mode is tether.ClusterMode.EMBEDDED
    assert "demo.echo" in cluster.registered_tasks
    assert cluster.limits.max_page_size > 0


# --------------------------------------------------------------------------- typed errors


def test_an_unknown_task_name_raises_task_not_found(client: tether.Client) -> None:
    with pytest.raises(tether.TaskNotFound) as caught:
        client.get("does-not-exist")
    assert caught.value.reason == "TASK_NOT_FOUND"
    assert "tasks/does-not-exist" in str(caught.value)


def test_interrupting_a_finished_task_raises_task_already_terminal(client: tether.Client) -> None:
    handle = client.submit("demo.echo", {"value": 1})
    handle.result(timeout=WAIT)
    with pytest.raises(tether.TaskAlreadyTerminal):
        handle.interrupt()


def test_an_unregistered_task_is_an_invalid_argument(client: tether.Client) -> None:
    with pytest.raises(tether.InvalidArgument) as caught:
        client.submit("no.such.task")
    assert caught.value.reason == "UNKNOWN_TASK"


def test_a_grace_above_the_server_limit_lists_the_field(client: tether.Client) -> None:
    with pytest.raises(tether.InvalidArgument) as caught:
        client.submit("demo.echo", grace=10**7)
    assert caught.value.reason == "INVALID_GRACE"
    assert any("grace" in violation.field for violation in caught.value.violations)


def test_a_repeated_request_id_returns_the_first_task_or_refuses_another_payload(
    client: tether.Client,
) -> None:
    request_id = str(uuid.uuid4())
    first = client.submit("demo.echo", {"value": 1}, request_id=request_id)
    again = client.submit("demo.echo", {"value": 1}, request_id=request_id)
    assert (again.name, again.deduplicated) == (first.name, True)
    with pytest.raises(tether.RequestIdReused):
        client.submit("demo.echo", {"value": 2}, request_id=request_id)


def test_a_negative_page_size_is_an_invalid_argument(client: tether.Client) -> None:
    with pytest.raises(tether.InvalidArgument) as caught:
        next(iter(client.list(page_size=-1)))
    assert caught.value.reason == "INVALID_PAGE_SIZE"


def test_a_garbage_resume_token_is_an_invalid_argument(client: tether.Client) -> None:
    with (
        client.watch(resume_token="garbage") as events,
        pytest.raises(tether.TetherError) as caught,
    ):
        next(events)
    assert caught.value.reason in {"INVALID_RESUME_TOKEN", "RESUME_TOKEN_EXPIRED"}


# --------------------------------------------------------------------------- asyncio


def test_the_async_client_submits_waits_and_interrupts(server: ServerProcess) -> None:
    async def scenario() -> None:
        async with tether.AsyncClient(server.address) as client:
            echo = await client.submit("demo.echo", {"value": [1, 2]})
            assert await echo.result(timeout=WAIT) == [1, 2]
            sleeper = await client.submit("demo.sleep", {"seconds": 60})
            async for event in sleeper.watch():
                if event.task.state is tether.TaskState.RUNNING:
                    break
            await sleeper.interrupt("async")
            with pytest.raises(tether.TaskInterrupted):
                await sleeper.result(timeout=WAIT)
            with pytest.raises(tether.TaskNotFound):
                await client.get("does-not-exist")
            names = [task.name async for task in client.list(page_size=2)]
            assert echo.name in names and sleeper.name in names

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


# --------------------------------------------------------------------------- restarts

RUN_SIZE = 30


def _key(event: tether.TaskEvent) -> tuple[str, int, str, str]:
    return (event.task.name, event.revision, event.type.name, event.task.state.name)


def _start_token(client: tether.Client, task_filter: tether.TaskFilter) -> str:
    """A resume token for "now": the checkpoint that ends an (empty) initial state."""
    with client.watch(task_filter, send_initial_state=True, checkpoints=True) as items:
        for item in items:
            if isinstance(item, tether.Checkpoint):
                return item.resume_token
    raise AssertionError("the watch ended without a checkpoint")


def _replay(
    client: tether.Client, task_filter: tether.TaskFilter, token: str, last: int
) -> list[Any]:
    """Every event after ``token`` up to revision ``last``, read by a fresh watch."""
    events = []
    with client.watch(task_filter, resume_token=token, checkpoints=True) as items:
        for item in items:
            if isinstance(item, tether.TaskEvent):
                events.append(item)
            if item.revision >= last:
                break
    return events


def _run_with_a_restart(
    server: ServerProcess,
    client: tether.Client,
    task_filter: tether.TaskFilter,
    watched: list[tether.TaskEvent],
) -> None:
    """Submits a run of tasks, restarts the server once a few ended, waits for all."""
    labels = dict(task_filter.labels)
    names = {
        client.submit("demo.count", {"n": 3, "interval": 0.1}, labels=labels).name
        for _ in range(RUN_SIZE)
    }

    def ended(count: int) -> bool:
        return sum(1 for e in list(watched) if e.task.state.is_terminal) >= count

    wait_until(lambda: ended(RUN_SIZE // 4))
    assert not ended(RUN_SIZE), "the run ended before the restart: make it longer"
    server.stop(timeout=15)
    server.start(timeout=60)
    wait_until(lambda: all(t.state.is_terminal for t in client.list(task_filter)), timeout=120)

    def every_task_ended_on_the_watch() -> bool:
        return {e.task.name for e in list(watched) if e.task.state.is_terminal} == names

    wait_until(every_task_ended_on_the_watch, timeout=60)


def _assert_same_as_a_fresh_replay(
    client: tether.Client,
    task_filter: tether.TaskFilter,
    token: str,
    watched: list[tether.TaskEvent],
) -> None:
    keys = [_key(event) for event in watched]
    revisions = [event.revision for event in watched]
    assert revisions == sorted(set(revisions)), "events repeated or out of order"
    replayed = [_key(event) for event in _replay(client, task_filter, token, revisions[-1])]
    assert keys == replayed


def test_a_sync_watch_survives_a_server_restart_and_delivers_every_event_once(
    server: ServerProcess, client: tether.Client
) -> None:
    task_filter = tether.TaskFilter(labels=label())
    token = _start_token(client, task_filter)
    watched: list[tether.TaskEvent] = []
    watcher = tether.Client(server.address)
    events = watcher.watch(task_filter, resume_token=token)

    def consume() -> None:
        for event in events:  # ends when closed below
            watched.append(event)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        _run_with_a_restart(server, client, task_filter, watched)
    finally:
        events.close()
        consumer.join(timeout=10)
        watcher.close()
    _assert_same_as_a_fresh_replay(client, task_filter, token, watched)


def test_an_async_watch_survives_a_server_restart_and_delivers_every_event_once(
    server: ServerProcess, client: tether.Client
) -> None:
    task_filter = tether.TaskFilter(labels=label())
    token = _start_token(client, task_filter)
    watched: list[tether.TaskEvent] = []
    loop = asyncio.new_event_loop()

    async def consume() -> None:
        async with (
            tether.AsyncClient(server.address) as async_client,
            async_client.watch(task_filter, resume_token=token) as events,
        ):
            async for event in events:
                watched.append(event)

    consumer = loop.create_task(consume())

    def run_loop() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(consumer)

    thread = threading.Thread(target=run_loop, daemon=True)
    thread.start()
    try:
        _run_with_a_restart(server, client, task_filter, watched)
    finally:
        loop.call_soon_threadsafe(consumer.cancel)
        thread.join(timeout=10)
        loop.close()
    _assert_same_as_a_fresh_replay(client, task_filter, token, watched)


# --------------------------------------------------------------------------- many waits


def test_many_results_wait_over_one_stream(server: ServerProcess) -> None:
    with tether.Client(server.address) as waiter:
        opened: list[object] = []
        open_stream = waiter._open_stream

        def counting_open(machine: Any) -> Any:
            opened.append(machine)
            return open_stream(machine)

        waiter._open_stream = counting_open  # type: ignore[method-assign]
        # A wait on a task that cannot end soon starts the outcome stream; every
        # submit after that is covered by it (a result() of a task that already
        # ended is one GetTask and no stream at all, so it must not be the first).
        sleeper = waiter.submit("demo.sleep", {"seconds": 60})
        sleeper_outcome: list[BaseException] = []

        def wait_sleeper() -> None:
            try:
                sleeper.result(timeout=WAIT)
            except BaseException as exc:  # the test inspects it
                sleeper_outcome.append(exc)

        sleeper_thread = threading.Thread(target=wait_sleeper)
        sleeper_thread.start()
        wait_until(lambda: waiter._outcomes.running)
        handles = [waiter.submit("demo.echo", {"value": n}) for n in range(40)]
        results: dict[int, Any] = {}

        def wait(n: int) -> None:
            results[n] = handles[n].result(timeout=WAIT)

        threads = [threading.Thread(target=wait, args=(n,)) for n in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=WAIT)
        assert results == {n: n for n in range(40)}
        assert waiter._outcomes.running  # one stream served them all, and still runs
        assert len(opened) == 1
        sleeper.interrupt("the test is over")
        sleeper_thread.join(timeout=WAIT)
        assert len(sleeper_outcome) == 1
        assert isinstance(sleeper_outcome[0], tether.TaskInterrupted)


def test_map_yields_in_order_and_raises_a_failure_where_it_stands(client: tether.Client) -> None:
    values = list(client.map("demo.echo", ({"value": n} for n in range(30)), max_in_flight=8))
    assert values == list(range(30))
    unordered = client.map(
        "demo.echo", ({"value": n} for n in range(30)), ordered=False, max_in_flight=8
    )
    assert sorted(unordered) == list(range(30))
    failing = client.map("demo.fail", [{"message": "boom"}], return_exceptions=True)
    (failure,) = list(failing)
    assert isinstance(failure, tether.TaskFailed)
    with pytest.raises(tether.TaskFailed):
        list(client.map("demo.fail", [{"message": "boom"}]))


def test_async_map_and_results_share_the_clients_stream(server: ServerProcess) -> None:
    async def scenario() -> None:
        async with tether.AsyncClient(server.address) as client:
            values = [v async for v in client.map("demo.echo", ({"value": n} for n in range(20)))]
            assert values == list(range(20))
            handles = [await client.submit("demo.echo", {"value": n}) for n in range(20)]
            assert await asyncio.gather(*(h.result(timeout=WAIT) for h in handles)) == list(
                range(20)
            )

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def test_results_pending_across_a_server_restart_all_arrive(server: ServerProcess) -> None:
    with tether.Client(server.address) as waiter:
        first = waiter.submit("demo.echo", {"value": "before"})
        assert first.result(timeout=WAIT) == "before"  # the outcome stream runs
        handles = [waiter.submit("demo.sleep", {"seconds": 0.5}) for _ in range(6)]
        server.stop(timeout=15)
        server.start(timeout=60)
        for handle in handles:  # each ends one way or another, none is lost
            try:
                handle.result(timeout=WAIT)
            except tether.TaskOutcomeError as exc:
                assert exc.task.state.is_terminal
