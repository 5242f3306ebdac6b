"""Tasks that go back to the queue: retried after a failure their policy retries
(``core/retry.py`` says when), or preempted for an urgent task (``core/preemption.py``
says which). Functions of ``ControlCore``, without I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .messages import EventKind, Instruction, StartTimer, TimerKey, TimerKind
from .model import AttemptEnding, ErrorReason, InterruptCause, Task, TaskError, TaskState
from .preemption import Preemption, plan_preemptions
from .records import close_attempt, move
from .retry import retry_delay

if TYPE_CHECKING:
    from .machine import ControlCore


def on_retry_timer(core: ControlCore, key: TimerKey, now: float, out: list[Instruction]) -> None:
    """A retried task's backoff is over: it joins the queue (unless it moved on)."""
    task = core.tasks.get(key.task_id)
    if (
        task is not None
        and task.state is TaskState.PENDING
        and task.attempt == key.attempt
        and task.id not in core._queue
    ):
        core._queue.push(task)
        core._dispatch(now, out)


def on_preempt_check(core: ControlCore, now: float, out: list[Instruction]) -> None:
    """A preempted task's minimum runtime is over: preemption may choose it now."""
    core._preempt_check_at = None
    if not core._shutting_down:  # the waiting task may be queued behind its victim
        preempt(core, now, out)
        core._dispatch(now, out)


def preempt(core: ControlCore, now: float, out: list[Instruction]) -> None:
    """Waiting tasks preempt lower-priority preemptible ones (the choice:
    ``core/preemption.py``); one ladder per (urgent, victim) pair. A task queued
    on an engine behind a preemptible lower-priority one preempts that one."""
    for urgent_id in [u for u, p in core._preempting.items() if not freeing(core, p)]:
        del core._preempting[urgent_id]
    behind = [
        (core.tasks[slot.task_id], engine)
        for engine, slot in core._pool.queued()
        if not slot.withdrawing and slot.cancel is None
    ]
    plan = plan_preemptions(
        core._queue,
        core.tasks,
        core.engines.values(),
        served=core._preempting.keys(),
        now=now,
        min_runtime=core.preempt_min_runtime,
        queued_behind=behind,
    )
    for urgent, victim, engine in plan.preemptions:
        core._preempting[urgent.id] = Preemption(victim.id, victim.attempt, engine.id)
        reason = f"preempted by {urgent.name} (priority {urgent.priority} > {victim.priority})"
        cause = InterruptCause.PREEMPTED
        core._begin_interrupt(victim, urgent.name, reason, cause, victim.grace, now, out)
    wait_until = plan.look_again_at
    if wait_until is not None and (
        core._preempt_check_at is None or wait_until < core._preempt_check_at
    ):
        core._preempt_check_at = wait_until
        key = TimerKey(TimerKind.PREEMPT_CHECK, "", 0)
        out.append(StartTimer(key, max(0.0, wait_until - now)))


def may_queue_behind(core: ControlCore, task_id: str) -> bool:
    """Neither an urgent task waiting for the engine its preemption frees, nor a
    preempted one: it resumes on the first free engine, not behind another long task."""
    if task_id in core._preempting:
        return False
    attempts = core.tasks[task_id].attempts
    return not attempts or attempts[-1].ending is not AttemptEnding.PREEMPTED


def freeing(core: ControlCore, preemption: Preemption) -> bool:
    return preemption.still_freeing(core.engines.get(preemption.engine_id))


def requeue(
    core: ControlCore, task: Task, error: TaskError, now: float, out: list[Instruction]
) -> bool:
    """End the current attempt and queue the task again, when the ending allows it.

    Preempted: queued at once. A failure the policy retries: queued when its
    backoff is over (a RETRY timer). The new attempt starts with no output of
    its own: a resumed task replays the text of its checkpoint first.
    """
    if error.reason is ErrorReason.PREEMPTED:
        ending, delay = AttemptEnding.PREEMPTED, 0.0
    else:
        retry = retry_delay(task, error.reason, core._uniform)
        if retry is None:
            return False
        ending, delay = AttemptEnding.RETRIED, retry
    close_attempt(task, ending, error, now)
    move(task, TaskState.PENDING)
    task.engine_id = None
    task.interrupt = None
    task.output, task.output_truncated = "", False
    task.progress_fraction, task.progress_message = 0.0, ""
    out.append(core._publish(task, EventKind.STATE_CHANGED, now))
    if delay > 0:
        out.append(StartTimer(TimerKey(TimerKind.RETRY, task.id, task.attempt), delay))
    else:
        core._queue.push(task)
    return True
