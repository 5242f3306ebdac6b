"""Interrupting running tasks: the escalation ladder against a real cluster."""

from __future__ import annotations

import os
import signal
import time

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .conftest import wait_for
from .helpers import get, seconds, submit, usable_engines, wait_in_c_call, wait_state, wait_terminal


def _wait_pool_full(cluster, size: int = 2, timeout: float = 60.0) -> list[cpb.Engine]:  # type: ignore[no-untyped-def]
    return wait_for(lambda: (e := usable_engines(cluster)) and len(e) >= size and e, timeout)


def test_interrupted_sleep_ends_interrupted_within_a_second_runs_its_hook_and_keeps_its_engine(
    tasks, cluster
):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    task = submit(tasks, "demo.sleep", args={"seconds": 60})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(0.3)  # let the runtime arm its guard
    t0 = time.monotonic()
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, reason="test"), timeout=10)
    done = wait_terminal(tasks, task.name, timeout=5)
    elapsed = time.monotonic() - t0
    assert done.state == tpb.TASK_STATE_INTERRUPTED
    assert elapsed < 1.0, f"took {elapsed:.3f}s"
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    assert done.interrupt.reason == "test"
    assert "[on_interrupt] demo.sleep cleaned up" in done.output
    # The same engine takes the next task: pin it by filling the other engine first.
    engine = running.engine_id
    follow = [submit(tasks, "demo.echo", args={"value": i}) for i in range(4)]
    ran_on = {wait_terminal(tasks, f.name).engine_id for f in follow}
    assert engine in ran_on
    assert all(get(tasks, f.name).state == tpb.TASK_STATE_SUCCEEDED for f in follow)


def test_stubborn_task_escalates_to_sigterm_and_keeps_its_engine(tasks, cluster):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    task = submit(tasks, "demo.stubborn", args={"seconds": 60})
    wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(0.3)
    grace = tpb.GracePeriods(sigint=seconds(0.3), sigterm=seconds(3))
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10)
    done = wait_terminal(tasks, task.name, timeout=15)
    assert done.state == tpb.TASK_STATE_INTERRUPTED
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGTERM
    nxt = submit(tasks, "demo.echo", args={"value": "after"})
    assert wait_terminal(tasks, nxt.name).state == tpb.TASK_STATE_SUCCEEDED


def test_task_stuck_in_c_escalates_to_sigkill_and_the_pool_is_refilled(tasks, cluster):  # type: ignore[no-untyped-def]
    before = {e.id for e in _wait_pool_full(cluster)}
    task = submit(tasks, "demo.c_call", args={"seconds": 60})
    running = wait_in_c_call(tasks, task.name)
    grace = tpb.GracePeriods(sigint=seconds(0.3), sigterm=seconds(0.3))
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10)
    done = wait_terminal(tasks, task.name, timeout=20)
    assert done.state == tpb.TASK_STATE_INTERRUPTED
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGKILL
    assert done.interrupt.stage == tpb.ESCALATION_STAGE_SIGKILL
    engines = _wait_pool_full(cluster, 2, timeout=60)
    ids = {e.id for e in engines}
    assert running.engine_id not in ids
    assert len(ids - before) >= 1  # a replacement registered
    nxt = submit(tasks, "demo.echo", args={"value": "after"})
    assert wait_terminal(tasks, nxt.name, timeout=30).state == tpb.TASK_STATE_SUCCEEDED


def test_engine_killed_from_outside_fails_its_task_with_engine_lost_and_is_replaced(tasks, cluster):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    task = submit(tasks, "demo.sleep", args={"seconds": 60})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    engine = next(e for e in usable_engines(cluster) if e.id == running.engine_id)
    os.kill(engine.pid, signal.SIGKILL)
    done = wait_terminal(tasks, task.name, timeout=20)
    assert done.state == tpb.TASK_STATE_FAILED
    assert done.error.reason == "ENGINE_LOST"
    engines = _wait_pool_full(cluster, 2, timeout=60)
    assert engine.id not in {e.id for e in engines}


def test_timeout_ends_a_task_timed_out_through_the_ladder(tasks, cluster):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    task = submit(tasks, "demo.sleep", args={"seconds": 60}, timeout=seconds(0.5))
    done = wait_terminal(tasks, task.name, timeout=10)
    assert done.state == tpb.TASK_STATE_TIMED_OUT
    assert done.interrupt.cause == tpb.INTERRUPT_CAUSE_TIMEOUT
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    assert done.error.reason == "TIMED_OUT"


def test_interrupt_of_pending_task_cancels_it_without_running_it(tasks, cluster):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    blockers = [submit(tasks, "demo.sleep", args={"seconds": 30}, priority=10) for _ in range(2)]
    for b in blockers:
        wait_state(tasks, b.name, {tpb.TASK_STATE_RUNNING})
    queued = submit(tasks, "demo.echo", args={"value": 1})
    resp = tasks.InterruptTask(spb.InterruptTaskRequest(name=queued.name), timeout=10)
    assert resp.task.state == tpb.TASK_STATE_CANCELLED
    assert resp.task.interrupt.final_stage == tpb.ESCALATION_STAGE_DEQUEUED
    assert not resp.task.HasField("engine_id")
    for b in blockers:
        tasks.InterruptTask(spb.InterruptTaskRequest(name=b.name), timeout=10)
        assert wait_terminal(tasks, b.name).state == tpb.TASK_STATE_INTERRUPTED


def test_interrupt_is_idempotent_while_interrupting_and_refused_after_success(tasks, cluster):  # type: ignore[no-untyped-def]
    _wait_pool_full(cluster)
    task = submit(tasks, "demo.stubborn", args={"seconds": 30})
    wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(0.3)
    grace = tpb.GracePeriods(sigint=seconds(2), sigterm=seconds(2))
    first = tasks.InterruptTask(
        spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10
    ).task
    assert first.state == tpb.TASK_STATE_INTERRUPTING
    again = tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name), timeout=10).task
    assert again.state == tpb.TASK_STATE_INTERRUPTING
    assert again.interrupt.request_time == first.interrupt.request_time
    assert wait_terminal(tasks, task.name, timeout=15).state == tpb.TASK_STATE_INTERRUPTED
