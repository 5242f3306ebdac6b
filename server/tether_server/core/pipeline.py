"""Pipelined dispatch: the part of the control core that queues a task behind a running one.

With ``pipeline_depth`` 2 an engine holds its running task and one more, sent at once
(``Dispatch``) so that the engine starts it the moment the running one ends, without a
round trip to the controller. The queued task stays PENDING (it has not started), is
counted as dispatched (``attempt`` + 1) and is named by its engine's
``queued_task``/``queued_attempt``; the pool keeps the rest (``pool.QueuedAttempt``).
The rules, all decided here without I/O:

* **Its turn.** When the running task's ``TaskFinished`` arrives, the queued one becomes
  the running one (RUNNING, published), unless the engine is being recycled: then the
  runtime starts nothing more (it answers ``not_started``) and the task goes back to
  the queue. Reports of the queued attempt that arrive before its turn (the engine ran
  both; replies and IOPub messages travel apart) are held and replayed at its turn.
* **Signals stay exact.** A signal names its (task, attempt) and the engine raises it
  only for that attempt (``runtime.attempts``); and no task is queued behind a task that
  is being interrupted: the interrupt *withdraws* the queued one first, so an engine on
  its way to SIGKILL holds nothing else.
* **Withdrawal** (``Withdraw`` -> ``Withdrawn``): the engine says whether the queued
  attempt had begun. Not begun: it goes back to the queue, or ends CANCELLED when a
  user interrupted it. Begun: it runs after the current one (an interrupt then applies
  at its turn).
* **No head-of-line blocking.** An engine that is idle (nothing waits in the queue for
  it) withdraws a task queued behind a busy engine, the one behind the longest-running
  task first, and runs it.
* **Priority.** A waiting task of higher priority than a queued one that fits the same
  engine withdraws it (the lowest first) and takes its place at the next dispatch.
* **Losses.** An engine lost with a queued task: back to the queue if it had not begun,
  else it ended with the engine (ENGINE_LOST / CLUSTER_LOST).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .messages import (
    Dispatch,
    Event,
    Instruction,
    InterruptRequested,
    OutcomeStatus,
    TaskCheckpointed,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    Withdraw,
    Withdrawn,
)
from .model import (
    Engine,
    EngineState,
    ErrorReason,
    InterruptCause,
    Task,
    TaskError,
    TaskState,
)
from .records import InvariantViolation
from .scheduling import choose_engine, queue_key

if TYPE_CHECKING:
    from .machine import ControlCore

Report = TaskProgressed | TaskOutput | TaskCheckpointed | TaskFinished
"""Events an engine sends about one attempt; those of a queued attempt wait for its turn."""

SYSTEM = "system"
"""``requested_by`` of interrupts the controller starts itself (timeout, limits, shutdown)."""

SHUTDOWN_REASON = "the server is shutting down"


def hold(core: ControlCore, event: Event, out: list[Instruction]) -> bool:
    """Keep a report of a queued attempt for its turn; True when ``event`` was one."""
    assert isinstance(event, Report)
    engine = core._pool.queued_on(event.task_id, event.attempt)
    if engine is None:
        return False
    if isinstance(event, TaskFinished) and event.outcome.status is OutcomeStatus.NOT_STARTED:
        unqueue(core, engine, out)  # withdrawn, or a recycled engine
        core._dispatch(event.now, out)
    else:
        slot = core._pool.slot(engine)
        assert slot is not None
        slot.early.append(event)
    return True


def queue_behind_running(
    core: ControlCore, plan: list[tuple[Task, Engine]], out: list[Instruction]
) -> None:
    """Queue each planned task behind its engine's running task."""
    for task, engine in plan:
        core._queue.remove(task.id)
        task.attempt += 1
        core._pool.queue_behind(engine, task)
        out.append(Dispatch(task.id, task.attempt, engine.id))


def promote(core: ControlCore, engine: Engine, now: float, out: list[Instruction]) -> None:
    """The running task ended: the queued one runs now (its early reports replayed)."""
    queued = core._pool.unqueue(engine)
    task = core.tasks[queued.task_id]
    if task.state is not TaskState.PENDING:
        raise InvariantViolation(f"queued task {task.id} is {task.state.name}")
    core._start(task, engine, now, out)
    cancel = queued.cancel
    if isinstance(cancel, InterruptRequested):  # asked while queued, too late to withdraw
        grace = cancel.grace or task.grace
        core._begin_interrupt(
            task, cancel.requested_by, cancel.reason, cancel.cause, grace, now, out
        )
    elif core._shutting_down:  # it had begun when the shutdown withdrew it
        cause = InterruptCause.SHUTDOWN
        core._begin_interrupt(task, SYSTEM, SHUTDOWN_REASON, cause, task.grace, now, out)
    for report in queued.early:
        out.extend(core.handle(report))  # type: ignore[arg-type]


def withdraw(core: ControlCore, engine: Engine, out: list[Instruction]) -> None:
    """Ask ``engine`` not to start its queued task (once)."""
    slot = core._pool.slot(engine)
    if slot is None or slot.withdrawing:
        return
    slot.withdrawing = True
    out.append(Withdraw(engine.id, slot.task_id, slot.attempt))


def on_withdrawn(core: ControlCore, event: Withdrawn, out: list[Instruction]) -> None:
    engine = core._pool.queued_on(event.task_id, event.attempt)
    slot = core._pool.slot(engine) if engine is not None else None
    if engine is None or slot is None or engine.id != event.engine_id:
        return  # it ended some other way meanwhile
    slot.withdrawing = False
    slot.began = not event.withdrawn
    if event.withdrawn:
        unqueue(core, engine, out)
    elif engine.current_task is None and engine.state is EngineState.IDLE:
        promote(core, engine, event.now, out)  # the running one ended
    core._dispatch(event.now, out)


def cancel_queued(
    core: ControlCore, task: Task, event: InterruptRequested, out: list[Instruction]
) -> bool:
    """An interrupt of a task queued on an engine: withdraw it, cancel on the answer.

    False when ``task`` is not queued on an engine (it waits in the core's queue).
    """
    engine = core._pool.queued_on(task.id, task.attempt)
    slot = core._pool.slot(engine) if engine is not None else None
    if engine is None or slot is None:
        return False
    slot.cancel = slot.cancel or event
    withdraw(core, engine, out)
    return True


def unqueue(core: ControlCore, engine: Engine, out: list[Instruction]) -> None:
    """The queued task will not start there: back to the queue, or CANCELLED if asked."""
    queued = core._pool.unqueue(engine)
    task = core.tasks[queued.task_id]
    if isinstance(queued.cancel, InterruptRequested):
        core._cancel_pending(task, queued.cancel, out)
    else:
        core._queue.push(task)


def unqueue_lost(
    core: ControlCore,
    engine: Engine,
    reason: ErrorReason,
    message: str,
    now: float,
    out: list[Instruction],
) -> None:
    """The engine is gone: its queued task goes back to the queue, unless it had begun."""
    slot = core._pool.slot(engine)
    if slot is None:
        return
    if not slot.began and not slot.early:  # no word from it: it had not begun
        unqueue(core, engine, out)
        return
    task = core.tasks[slot.task_id]
    core._pool.unqueue(engine)
    core._finish(task, TaskState.FAILED, TaskError(reason, message=message), now, out)


def rebalance(core: ControlCore, out: list[Instruction]) -> None:
    """Idle engines take back what waits behind busy ones (no head-of-line blocking).

    A task queued behind a long one would otherwise wait for it while another
    engine idles: each idle engine withdraws one queued task that fits it, behind
    the running task that started first. Nothing happens while every engine is busy
    (the usual case under load), so this costs nothing when pipelining pays.
    """
    if core._pool.pipeline_depth < 2:
        return
    idle = core._pool.dispatchable()
    if not idle:
        return
    queued = [
        (engine, slot)
        for engine, slot in core._pool.queued()
        if not slot.withdrawing and slot.cancel is None and engine.current_task is not None
    ]

    queued.sort(key=lambda pair: core.tasks[pair[0].current_task or ""].start_time or 0.0)
    for engine, slot in queued:
        if not idle:
            return
        taker = choose_engine(core.tasks[slot.task_id].required_tags, idle)
        if taker is not None:
            withdraw(core, engine, out)
            idle.remove(taker)


def reclaim_queued(core: ControlCore, out: list[Instruction]) -> None:
    """A waiting task of higher priority takes the place of a queued lower one.

    Each queued task of lower priority than a waiting task that fits its engine is
    withdrawn (the lowest first); it comes back to the queue and the place goes to
    the urgent task at the next dispatch.
    """
    candidates = [
        (engine, core.tasks[slot.task_id])
        for engine, slot in core._pool.queued()
        if not slot.withdrawing and slot.cancel is None
    ]
    for task_id in core._queue:
        if not candidates:
            return
        task = core.tasks[task_id]
        if task.priority <= min(queued.priority for _engine, queued in candidates):
            return  # the queue is in priority order: nobody later outranks a queued task
        needed = frozenset(task.required_tags)
        fitting = [
            pair
            for pair in candidates
            if needed <= pair[0].tags and pair[1].priority < task.priority
        ]
        if fitting:
            worst = max(fitting, key=lambda pair: queue_key(pair[1]))
            withdraw(core, worst[0], out)
            candidates.remove(worst)
