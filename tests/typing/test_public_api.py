"""Type-checker tests of the public API: ``mypy --strict`` must accept this file as is.

Nothing here runs against a server; the functions are never called by pytest.
Each line states the type a user gets, by assignment or ``assert_type``. Lines
ending in ``# type: ignore[...]`` are misuses the checker must reject: with
``warn_unused_ignores`` (part of --strict) an accepted misuse fails the check.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, assert_type

import grpc

import tether


def sync_client_surface(client: tether.Client) -> None:
    handle: tether.TaskHandle = client.submit(
        "demo.echo",
        {"value": [1, 2, 3]},
        labels={"team": "search"},
        priority=2,
        timeout=timedelta(seconds=30),
        grace=5.0,
        request_id="5d0c1f7e-8d7a-4b4e-9c55-8ef8e0c2d6a1",
        resume_from="tasks/abc",
        required_tags=["gpu"],
    )
    name: str = handle.name
    task_id: str = handle.id
    deduplicated: bool = handle.deduplicated
    submitted: tether.Task | None = handle.submitted
    value: Any = handle.result(timeout=10)
    current: tether.Task = handle.refresh()
    after: tether.Task = handle.interrupt("enough", grace=tether.GracePeriods(sigint=timedelta(1)))
    for event in handle.watch():
        assert_type(event, tether.TaskEvent)
        chunk: str = event.output_chunk

    task: tether.Task = client.get("abc")
    state: tether.TaskState = task.state
    terminal: bool = task.state.is_terminal
    engine: int | None = task.engine_id
    created: datetime | None = task.create_time
    timeout: timedelta | None = task.timeout
    progress: tether.Progress | None = task.progress
    interrupt: tether.InterruptRecord | None = task.interrupt
    if interrupt is not None:
        stage: tether.EscalationStage = interrupt.final_stage
        del stage
    error: tether.TaskError | None = task.error

    for listed in client.list(tether.TaskFilter(states=[tether.TaskState.RUNNING]), page_size=50):
        assert_type(listed, tether.Task)

    events = client.watch(resume_token="t", send_initial_state=True)
    assert_type(events, tether.TaskWatch[tether.TaskEvent])
    token: str = events.resume_token
    with client.watch(checkpoints=True) as mixed:
        for item in mixed:
            assert_type(item, tether.TaskEvent | tether.Checkpoint)

    cluster: tether.Cluster = client.cluster()
    for member in cluster.engines:
        engine_state: tether.EngineState = member.state
        del engine_state
    for model in cluster.models:
        context: int = model.context_length
        del context
    stopped: tether.Task = client.interrupt("tasks/abc", reason="stop", grace=2)
    other: tether.TaskHandle = client.get_handle("abc")
    del (name, task_id, deduplicated, submitted, value, current, after, chunk, state, terminal)
    del (engine, created, timeout, progress, error, token, cluster, stopped, other)


async def async_client_surface(client: tether.AsyncClient) -> None:
    handle: tether.AsyncTaskHandle = await client.submit("demo.sleep", {"seconds": 1})
    value: Any = await handle.result(timeout=timedelta(minutes=1))
    current: tether.Task = await handle.refresh()
    after: tether.Task = await handle.interrupt()
    async for event in handle.watch(exclude_progress=True):
        assert_type(event, tether.TaskEvent)
    async for listed in client.list():
        assert_type(listed, tether.Task)
    async with client.watch(tether.TaskFilter(tasks=["demo.sleep"])) as events:
        async for item in events:
            assert_type(item, tether.TaskEvent)
    async for mixed in client.watch(checkpoints=True):
        assert_type(mixed, tether.TaskEvent | tether.Checkpoint)
    cluster: tether.Cluster = await client.cluster()
    task: tether.Task = await client.get("abc")
    del value, current, after, cluster, task


def exceptions_surface(client: tether.Client) -> None:
    try:
        client.get_handle("abc").result()
    except tether.TaskInterrupted as exc:
        interrupted: tether.Task = exc.task
        del interrupted
    except tether.TaskOutcomeError as exc:
        outcome: tether.Task = exc.task
        del outcome
    except tether.InvalidArgument as exc:
        violations: list[tether.FieldViolation] = exc.violations
        del violations
    except tether.TetherError as exc:
        code: grpc.StatusCode | None = exc.code
        reason: str = exc.reason
        metadata: dict[str, str] = exc.metadata
        del code, reason, metadata


def misuses_are_rejected(client: tether.Client, async_client: tether.AsyncClient) -> None:
    client.submit(42)  # type: ignore[arg-type]
    client.submit("demo.echo", labels={"n": 1})  # type: ignore[dict-item]
    client.list(filter=[tether.TaskState.RUNNING])  # type: ignore[arg-type]
    client.get_handle("abc").result(timeout="5s")  # type: ignore[arg-type]
    name: int = client.get("abc").name  # type: ignore[assignment]
    for event in async_client.watch():  # type: ignore[attr-defined]
        del event
    del name
