"""A restarted controller's task table: restore it, and in attached mode re-attach to it.

``restore`` loads the stored tasks into a fresh core. PENDING tasks are queued again in
their old order. What happens to the tasks that were on an engine depends on the cluster:

* **Embedded** (the cluster died with the old controller): RUNNING and INTERRUPTING
  tasks end FAILED (CONTROLLER_RESTARTED).
* **Attached** (``reattach=True``: the operator's cluster outlived the controller): the
  core starts a *reconciliation*. Nothing is dispatched, because any PENDING task may
  still be queued on an engine by the old controller (pipelined dispatch does not store
  that). The controller asks the hub's records and the engines what became of every
  attempt the old controller sent (``reattach.py``) and answers with one ``Reattached``:

  ============================================  =====================================
  what the hub and the engine say of an attempt  the task
  ============================================  =====================================
  it runs (began, no result yet)                 RUNNING on that engine (adopted): its
                                                 reports, interrupts and result work as
                                                 for any task; INTERRUPTING restarts
                                                 its ladder at SIGINT
  it began behind another one on its engine      queued behind it (``began``)
  it ended (result in the hub)                   that ending, as if it had been heard
  it had not started (withdrawn now)             PENDING (again): never ran, runs later
  nothing known (no hub record, NoDB)            FAILED (CONTROLLER_RESTARTED), or
                                                 PENDING when it was PENDING
  ============================================  =====================================

  While the reconciliation lasts, reports of those tasks are held and replayed when the
  task is adopted, and interrupts of them are deferred and applied after it; tasks
  submitted meanwhile are queued (they run after it).

Terminal tasks are kept as they are. Revisions continue above the highest restored one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import engine_reports as reports
from .errors import TaskAlreadyTerminal
from .escalation import interrupted_ending
from .messages import (
    Event,
    EventKind,
    FoundAttempt,
    Instruction,
    InterruptRequested,
    OutcomeStatus,
    Reattached,
    StartTimer,
    TimerKey,
    TimerKind,
)
from .model import (
    AttemptEnding,
    EngineState,
    ErrorReason,
    EscalationStage,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from .pipeline import Report
from .records import close_attempt, move

if TYPE_CHECKING:
    from .machine import ControlCore

RESTARTED = "the controller restarted while the task ran"


@dataclass(slots=True)
class Reconciliation:
    """What a core that re-attaches keeps until the controller's ``Reattached``."""

    tasks: set[str]
    """The restored tasks that may be on an engine (every live one)."""
    held: dict[tuple[str, int], list[Event]] = field(default_factory=dict)
    """Their engine reports, by attempt, replayed when the attempt is adopted."""
    interrupts: dict[str, InterruptRequested] = field(default_factory=dict)
    """Interrupts of them, applied once it is known where they are."""


def restore(
    core: ControlCore, tasks: Iterable[Task], now: float, *, reattach: bool
) -> list[Instruction]:
    """Load the task table of a restarted controller (see the module's docstring)."""
    if core.tasks:
        raise ValueError("restore() must be the first call on a fresh core")
    restored = sorted(tasks, key=lambda task: (task.seq, task.id))
    if len({task.id for task in restored}) != len(restored):
        raise ValueError("restore() got the same task id twice")
    highest = max((task.revision for task in restored), default=0)
    core._next_revision = max(core._next_revision, highest + 1)
    out: list[Instruction] = []
    for task in restored:
        core.tasks[task.id] = task
    live = [task for task in restored if not task.state.terminal]
    if reattach:
        core._reconciling = Reconciliation({task.id for task in live})
        for task in live:
            if task.state is TaskState.PENDING:
                core._queue.push(task)  # its queue timeout starts when it is reconciled
        return out
    for task in live:
        if task.state is TaskState.PENDING:
            core._queue.push(task)
            out.extend(_queue_timers([task], now))
        else:
            error = TaskError(ErrorReason.CONTROLLER_RESTARTED, message=RESTARTED)
            core._finish(task, TaskState.FAILED, error, now, out)
    core._dispatch(now, out)
    return out


def hold(core: ControlCore, event: Report) -> bool:
    """Keep an engine report of a task not reconciled yet; True when ``event`` was one."""
    rec = core._reconciling
    if rec is None or event.task_id not in rec.tasks:
        return False
    rec.held.setdefault((event.task_id, event.attempt), []).append(event)
    return True


def defer_interrupt(core: ControlCore, event: InterruptRequested) -> bool:
    """Keep an interrupt of a task not reconciled yet (the first one wins)."""
    rec = core._reconciling
    if rec is None or event.task_id not in rec.tasks:
        return False
    rec.interrupts.setdefault(event.task_id, event)
    return True


def interrupt_deferred(core: ControlCore, task_id: str) -> bool:
    rec = core._reconciling
    return rec is not None and task_id in rec.interrupts


def on_reattached(core: ControlCore, event: Reattached, out: list[Instruction]) -> None:
    """The controller found what became of the old controller's work: apply it."""
    rec = core._reconciling
    if rec is None:
        return
    core._reconciling = None
    now = event.now
    found: dict[str, list[FoundAttempt]] = {}
    for f in event.found:
        found.setdefault(f.task_id, []).append(f)
    running: list[tuple[Task, FoundAttempt]] = []
    for task_id in sorted(rec.tasks, key=lambda t: core.tasks[t].seq):
        task = core.tasks[task_id]
        # A PENDING task's stored attempt ended before (a retry waits); one queued by
        # the old controller has a higher number. An active task's is the one that ran.
        mine = [f for f in found.get(task_id, ()) if _current_for(task, f.attempt)]
        for f in mine:
            if not f.began or _not_started(f):  # an attempt number is never used twice
                task.attempt = max(task.attempt, f.attempt)
        began = sorted((f for f in mine if f.began), key=lambda f: (f.attempt, f.submitted))
        latest = began[-1] if began else None
        if latest is None:
            if task.state.active and any(f.attempt == task.attempt for f in mine):
                _requeue_unstarted(core, task, now, out)  # it never started
            elif task.state.active:
                message = f"{RESTARTED}; {event.detail or 'the hub has no record of it'}"
                error = TaskError(ErrorReason.CONTROLLER_RESTARTED, message=message)
                core._finish(task, TaskState.FAILED, error, now, out)
        elif latest.outcome is not None and not _not_started(latest):
            _deliver(core, task, latest, now, out)
        elif latest.outcome is None:
            running.append((task, latest))
        elif task.state.active:  # it answered not_started: it never ran
            _requeue_unstarted(core, task, now, out)
    # On one engine, attempts run in the order they were sent: the first that has not
    # ended is the running one; one more may have begun behind it (its reply pending).
    for task, f in sorted(running, key=lambda pair: pair[1].submitted):
        _adopt(core, rec, task, f, now, out)
    out.extend(_queue_timers([core.tasks[t] for t in rec.tasks if t in core._queue], now))
    for interrupt in rec.interrupts.values():
        with contextlib.suppress(TaskAlreadyTerminal):
            out.extend(core.handle(interrupt))
    core._dispatch(now, out)


def _not_started(f: FoundAttempt) -> bool:
    return f.outcome is not None and f.outcome.status is OutcomeStatus.NOT_STARTED


def _current_for(task: Task, attempt: int) -> bool:
    """Whether a found ``attempt`` is one the stored task does not know the end of."""
    if task.state is TaskState.PENDING:
        return attempt > task.attempt
    return attempt == task.attempt


def _adopt(
    core: ControlCore,
    rec: Reconciliation,
    task: Task,
    f: FoundAttempt,
    now: float,
    out: list[Instruction],
) -> None:
    """``task``'s attempt ``f`` runs on its engine: take it up where it is."""
    pool = core._pool
    engine = core.engines.get(f.engine_id)
    if engine is None or engine.state not in (
        EngineState.STARTING,
        EngineState.IDLE,
        EngineState.BUSY,
    ):
        message = f"{RESTARTED}; engine {f.engine_id} that ran it is gone"
        _own(core, task, f, now)
        core._finish(task, TaskState.FAILED, TaskError(ErrorReason.ENGINE_LOST, message), now, out)
        return
    behind = engine.current_task is not None
    if behind and engine.queued_task is not None:
        message = f"{RESTARTED}; engine {f.engine_id} holds more than it can"
        error = TaskError(ErrorReason.CONTROLLER_RESTARTED, message=message)
        _own(core, task, f, now)
        core._finish(task, TaskState.FAILED, error, now, out)
        return
    if behind:  # it began behind the running one: queued, its turn comes next
        if task.state is TaskState.PENDING:
            core._queue.remove(task.id)
        task.attempt = f.attempt
        pool.queue_behind(engine, task)
        slot = pool.slot(engine)
        assert slot is not None
        slot.began = True
        slot.early.extend(rec.held.pop((task.id, f.attempt), []))
        return
    fresh = task.state is TaskState.PENDING
    _own(core, task, f, now)
    pool.adopt(engine, task)
    if fresh:
        out.append(core._publish(task, EventKind.STATE_CHANGED, now))
    if task.timeout is not None:
        left = (task.start_time or now) + task.timeout - now
        out.append(StartTimer(TimerKey(TimerKind.TIMEOUT, task.id, task.attempt), max(0.0, left)))
    record = task.interrupt
    if task.state is TaskState.INTERRUPTING and record is not None:
        # Its ladder's deadlines died with the old controller: it starts again at SIGINT.
        record.stage = EscalationStage.SIGINT
        out.append(core._publish(task, EventKind.UPDATED, now))
        out.append(pool.signal(engine, task, EscalationStage.SIGINT))
        key = TimerKey(TimerKind.ESCALATE, task.id, task.attempt, EscalationStage.SIGINT)
        out.append(StartTimer(key, record.grace.sigint))
    for report in rec.held.pop((task.id, f.attempt), []):
        out.extend(core.handle(report))


def _own(core: ControlCore, task: Task, f: FoundAttempt, now: float) -> None:
    """Make ``f`` the task's current attempt (RUNNING when it was PENDING)."""
    if task.state is TaskState.PENDING:
        core._queue.remove(task.id)
        task.attempt = f.attempt
        move(task, TaskState.RUNNING)
        task.engine_id = f.engine_id
        task.start_time = f.submitted
        task.attempts.append(TaskAttempt(f.attempt, f.engine_id, f.submitted))


def _deliver(
    core: ControlCore, task: Task, f: FoundAttempt, now: float, out: list[Instruction]
) -> None:
    """The attempt ended while no controller listened: its ending, from the hub's record."""
    outcome = f.outcome
    assert outcome is not None
    _own(core, task, f, now)
    reports.conclude(core, task, outcome, now, out, may_recycle=False)


def _requeue_unstarted(core: ControlCore, task: Task, now: float, out: list[Instruction]) -> None:
    """An active task whose attempt never started: back to the queue (it had no effect),
    or, when it was being interrupted, ended as asked (final stage DEQUEUED)."""
    record = task.interrupt
    if task.state is TaskState.INTERRUPTING and record is not None:
        record.final_stage = EscalationStage.DEQUEUED
        state, stopped = interrupted_ending(record, final_stage=EscalationStage.DEQUEUED)
        core._finish(task, state, stopped, now, out)
        return
    error = TaskError(ErrorReason.CONTROLLER_RESTARTED, message=f"{RESTARTED} before it started")
    close_attempt(task, AttemptEnding.RETRIED, error, now)
    move(task, TaskState.PENDING)
    task.engine_id = None
    task.start_time = None
    task.interrupt = None
    core._queue.push(task)
    out.append(core._publish(task, EventKind.STATE_CHANGED, now))


def _queue_timers(tasks: Iterable[Task], now: float) -> list[Instruction]:
    """Queue timeouts of PENDING tasks, counting from their creation."""
    return [
        StartTimer(
            TimerKey(TimerKind.QUEUE_TIMEOUT, task.id, task.attempt),
            max(0.0, task.create_time + task.queue_timeout - now),
        )
        for task in tasks
        if task.state is TaskState.PENDING and task.queue_timeout is not None
    ]
