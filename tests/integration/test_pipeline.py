"""Pipelined dispatch on a real cluster (the server's default, --pipeline-depth 2).

A task queued behind a running one is PENDING with ``attempt`` 1 (it was dispatched);
interrupts stay exact: a SIGINT meant for a task that just ended never reaches the task
queued behind it on the same engine.
"""

from __future__ import annotations

import random

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .helpers import engines, get, submit, wait_pool, wait_state, wait_terminal


def _interrupt(tasks, name: str) -> tpb.Task:  # type: ignore[no-untyped-def]
    return tasks.InterruptTask(spb.InterruptTaskRequest(name=name), timeout=10).task


def _wait_queued_behind(tasks, name: str) -> tpb.Task:  # type: ignore[no-untyped-def]
    """Wait until ``name`` is dispatched behind a running task: PENDING, attempt 1."""
    import time

    deadline = time.monotonic() + 30
    while True:
        task = get(tasks, name)
        if task.state == tpb.TASK_STATE_PENDING and task.attempt == 1:
            return task
        assert task.state == tpb.TASK_STATE_PENDING, tpb.TaskState.Name(task.state)
        assert time.monotonic() < deadline, f"{name} was never queued behind a running task"
        time.sleep(0.02)


def test_a_task_queued_behind_a_running_one_is_cancelled_without_touching_it(tasks, cluster):  # type: ignore[no-untyped-def]
    wait_pool(cluster, 2)
    sleepers = [submit(tasks, "demo.sleep", args={"seconds": 60}, priority=10) for _ in range(2)]
    for sleeper in sleepers:
        wait_state(tasks, sleeper.name, {tpb.TASK_STATE_RUNNING})
    behind = [submit(tasks, "demo.echo", args={"value": n}, priority=10) for n in range(2)]
    for task in behind:
        _wait_queued_behind(tasks, task.name)
    waiting = submit(tasks, "demo.echo", args={"value": "last"})  # no place left: core queue
    assert get(tasks, waiting.name).attempt == 0

    cancelled = _interrupt(tasks, behind[0].name)
    assert cancelled.state == tpb.TASK_STATE_CANCELLED
    assert cancelled.interrupt.final_stage == tpb.ESCALATION_STAGE_DEQUEUED
    for sleeper in sleepers:  # the running tasks were not touched
        now = get(tasks, sleeper.name)
        assert now.state == tpb.TASK_STATE_RUNNING and not now.HasField("interrupt")

    for sleeper in sleepers:
        _interrupt(tasks, sleeper.name)
    assert wait_terminal(tasks, behind[1].name).state == tpb.TASK_STATE_SUCCEEDED
    assert wait_terminal(tasks, waiting.name).state == tpb.TASK_STATE_SUCCEEDED
    assert get(tasks, behind[0].name).state == tpb.TASK_STATE_CANCELLED  # never ran


def test_a_higher_priority_task_takes_the_place_of_a_queued_lower_one(tasks, cluster):  # type: ignore[no-untyped-def]
    wait_pool(cluster, 2)
    sleepers = [submit(tasks, "demo.sleep", args={"seconds": 5}, priority=50) for _ in range(2)]
    for sleeper in sleepers:
        wait_state(tasks, sleeper.name, {tpb.TASK_STATE_RUNNING})
    low = [submit(tasks, "demo.echo", args={"value": n}, priority=0) for n in range(2)]
    for task in low:
        _wait_queued_behind(tasks, task.name)
    urgent = submit(tasks, "demo.echo", args={"value": "urgent"}, priority=40)
    _wait_queued_behind(tasks, urgent.name)  # it withdrew a low one and took its place
    queued = sorted(e.queued_task for e in engines(cluster) if e.queued_task)
    assert urgent.name in queued and len(queued) == 2  # the last low one waits in the queue
    (withdrawn,) = [t.name for t in low if t.name not in queued]

    done = {t.name: wait_terminal(tasks, t.name) for t in [*sleepers, urgent, *low]}
    assert all(t.state == tpb.TASK_STATE_SUCCEEDED for t in done.values())
    assert done[withdrawn].attempt >= 2  # dispatched again after it was withdrawn


def test_a_late_sigint_never_reaches_the_task_queued_behind(tasks, cluster):  # type: ignore[no-untyped-def]
    """Interrupt every other short task near its end: the ones between must all succeed.

    With two engines and a task queued behind each running one, the task after an
    interrupted one is already on the same engine when the SIGINT lands; a signal that
    is late for its task must be dropped, never raised in the next.
    """
    wait_pool(cluster, 2)
    rng = random.Random(7)
    targets, bystanders = [], []
    for n in range(60):
        seconds = rng.uniform(0.01, 0.06)
        task = submit(tasks, "demo.sleep", args={"seconds": seconds})
        (targets if n % 2 == 0 else bystanders).append(task)
        if n % 2 == 0 and n % 4 == 0:
            _interrupt(tasks, task.name)  # often before it starts or while it runs
    for task in targets[1::2]:  # and some just as they end
        wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING, *TERMINAL})
        try:
            _interrupt(tasks, task.name)
        except Exception as exc:  # it ended first: FAILED_PRECONDITION, fine
            assert "already ended" in str(exc)
    for task in bystanders:
        ended = wait_terminal(tasks, task.name, timeout=60)
        assert ended.state == tpb.TASK_STATE_SUCCEEDED, (
            f"{task.name} was hit by a signal meant for another task: "
            f"{tpb.TaskState.Name(ended.state)} {ended.error.message}"
        )
        assert not ended.HasField("interrupt")
    for task in targets:
        assert wait_terminal(tasks, task.name, timeout=60).state in TERMINAL


TERMINAL = {
    tpb.TASK_STATE_SUCCEEDED,
    tpb.TASK_STATE_FAILED,
    tpb.TASK_STATE_INTERRUPTED,
    tpb.TASK_STATE_CANCELLED,
    tpb.TASK_STATE_TIMED_OUT,
}
