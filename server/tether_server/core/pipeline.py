"""Pipelined dispatch: the part of the control core that queues tasks behind a running one.

With ``pipeline_depth`` N > 1 an engine holds its running task and tasks queued behind
it, sent at once (``Dispatch``) so that the engine starts the next the moment the
running one ends, without a round trip to the controller. A queued task stays PENDING
(it has not started), is counted as dispatched (``attempt`` + 1) and is held in its
engine's queue (``pool.QueuedAttempt``, in the order the engine runs them). The rules,
all decided here without I/O:

* **Room** (``room``). One place right behind the running task, for any task (the
  depth-2 pipeline). Deeper places, up to N - 1 queued, only while the running task,
  everything queued and the newcomer are of functions whose recent runs were short
  (``core/pace.py``), and only while no waiting task that is not short is ahead in the
  queue. Under load those deep places fill several at once and the controller sends
  them in one request (``dispatch.EngineDriver.flush``, ``runtime/batch.py``).
* **Turns.** When the running task's ``TaskFinished`` arrives, the first queued one
  becomes the running one (RUNNING, published), unless the engine is being recycled:
  then the runtime starts nothing more (it answers ``not_started``) and the tasks go
  back to the queue. Reports of a queued attempt that arrive before its turn (the
  engine ran it; replies and IOPub messages travel apart) are held and replayed at
  its turn.
* **Signals stay exact.** A signal names its (task, attempt) and the engine raises it
  only for that attempt (``runtime.attempts``); and nothing is queued behind a task
  that is being interrupted: the interrupt *withdraws* everything queued first, so an
  engine on its way to SIGKILL holds nothing else.
* **Withdrawal** (``Withdraw`` -> ``Withdrawn``): the engine says whether the queued
  attempt had begun. Not begun: it goes back to the queue, or ends CANCELLED when a
  user interrupted it. Begun: it (and everything queued before it) runs in turn.
* **No head-of-line blocking.** An engine that is idle (nothing waits in the queue for
  it) withdraws the last task queued behind a busy engine, the one behind the
  longest-running task first, and runs it.
* **Priority.** A waiting task of higher priority than a queued one that fits the same
  engine withdraws it (the lowest first) and takes a place at the next dispatch. In a
  deep queue that place is at its end: the urgent task may still wait for the short
  ones queued before it (N - 2 at most, each under 20 ms in its recent runs).
* **Losses.** An engine lost with queued tasks: the last one with word of a start (an
  early report, a withdrawal answered too late) and all before it ended with the
  engine (ENGINE_LOST / CLUSTER_LOST); the rest go back to the queue.
"""

from __future__ import annotations

from itertools import takewhile
from typing import TYPE_CHECKING

from . import requeueing
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
from .pool import QueuedAttempt
from .records import InvariantViolation
from .scheduling import choose_engine, plan_dispatch, queue_key

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
    queued = core._pool.slot_of(event.task_id, event.attempt)
    assert queued is not None
    if isinstance(event, TaskFinished) and event.outcome.status is OutcomeStatus.NOT_STARTED:
        unqueue(core, engine, out, queued)  # withdrawn, or a recycled engine
        settle(core, engine, event.now, out)
        core._dispatch(event.now, out)
    else:
        queued.early.append(event)
    return True


def room(core: ControlCore, engine: Engine) -> int:
    """How many more tasks ``engine`` may hold behind its running one now.

    One, the place right behind the running task, for any task. Deeper places (up to
    ``pipeline_depth`` - 1 queued) only while the running task and everything queued
    are of functions whose recent runs were short (``pace.Pace``): a long task is
    never stuck behind a row of others, and a row of short ones costs its last
    member little wait. Whoever takes a deeper place must be short as well
    (``queue_behind_running``)."""
    queue = core._pool.queue_of(engine)
    if not queue:
        return 1
    limit = core._pool.pipeline_depth - 1
    if len(queue) >= limit or not core._pace.short(core.tasks[engine.current_task or ""].task):
        return 0
    if not all(core._pace.short(core.tasks[q.task_id].task) for q in queue):
        return 0
    return limit - len(queue)


def queue_behind_running(core: ControlCore, behind: list[Engine], out: list[Instruction]) -> None:
    """Queue waiting tasks behind the running ones of ``behind`` while they have room.

    Round by round, one task per engine per round (``plan_dispatch``), so a burst is
    spread over the engines. A deeper place takes only a short task, and only while
    no waiting task that is not short is ahead of it in the queue: short tasks never
    overtake a long one into places it could not have.
    """
    while behind:
        shallow = [engine for engine in behind if core._pool.slot(engine) is None]
        deep = [engine for engine in behind if core._pool.slot(engine) is not None]
        waiting = (t for t in core._queue if requeueing.may_queue_behind(core, t))
        plan = plan_dispatch(waiting, core.tasks, shallow) if shallow else []
        if deep:
            taken = {task.id for task, _engine in plan}
            short = takewhile(
                lambda t: core._pace.short(core.tasks[t].task),
                (t for t in core._queue if t not in taken and requeueing.may_queue_behind(core, t)),
            )
            plan += plan_dispatch(short, core.tasks, deep)
        if not plan:
            return
        for task, engine in plan:
            core._queue.remove(task.id)
            task.attempt += 1
            core._pool.queue_behind(engine, task)
            out.append(Dispatch(task.id, task.attempt, engine.id))
        behind = [engine for _task, engine in plan if room(core, engine) > 0]


def promote(core: ControlCore, engine: Engine, now: float, out: list[Instruction]) -> None:
    """The running task ended: the first queued one runs now (its early reports replayed)."""
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


def settle(core: ControlCore, engine: Engine, now: float, out: list[Instruction]) -> None:
    """An idle engine whose first queued attempt is not being withdrawn runs it now: the
    engine runs its queue in order, so that attempt is what it works on."""
    slot = core._pool.slot(engine)
    if (
        slot is not None
        and not slot.withdrawing
        and engine.current_task is None
        and engine.state is EngineState.IDLE
    ):
        promote(core, engine, now, out)


def withdraw(
    core: ControlCore, engine: Engine, out: list[Instruction], queued: QueuedAttempt | None = None
) -> None:
    """Ask ``engine`` not to start ``queued`` (default: everything queued there), once each."""
    for slot in [queued] if queued is not None else core._pool.queue_of(engine):
        if not slot.withdrawing:
            slot.withdrawing = True
            out.append(Withdraw(engine.id, slot.task_id, slot.attempt))


def on_withdrawn(core: ControlCore, event: Withdrawn, out: list[Instruction]) -> None:
    engine = core._pool.queued_on(event.task_id, event.attempt)
    slot = core._pool.slot_of(event.task_id, event.attempt)
    if engine is None or slot is None or engine.id != event.engine_id:
        return  # it ended some other way meanwhile
    slot.withdrawing = False
    if event.withdrawn:
        unqueue(core, engine, out, slot)
    else:
        # It began, so everything queued before it did too (the engine runs them in order).
        for queued in core._pool.queue_of(engine):
            queued.began = True
            if queued is slot:
                break
    settle(core, engine, event.now, out)  # the running one ended meanwhile
    core._dispatch(event.now, out)


def cancel_queued(
    core: ControlCore, task: Task, event: InterruptRequested, out: list[Instruction]
) -> bool:
    """An interrupt of a task queued on an engine: withdraw it, cancel on the answer.

    False when ``task`` is not queued on an engine (it waits in the core's queue).
    """
    engine = core._pool.queued_on(task.id, task.attempt)
    slot = core._pool.slot_of(task.id, task.attempt)
    if engine is None or slot is None:
        return False
    slot.cancel = slot.cancel or event
    withdraw(core, engine, out, slot)
    return True


def unqueue(
    core: ControlCore, engine: Engine, out: list[Instruction], queued: QueuedAttempt | None = None
) -> None:
    """A queued task (default: the first) will not start there: back to the queue, or
    CANCELLED if asked."""
    queued = core._pool.unqueue(engine, queued)
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
    """The engine is gone: its queued tasks go back to the queue, but for those that had
    begun: those ended with it. The engine runs its queue in order, so the last one
    with word of a start (an answer to a withdrawal, an early report) and all before
    it had begun; the rest had not, as far as anyone can tell."""
    queue = core._pool.queue_of(engine)
    begun = max((i + 1 for i, q in enumerate(queue) if q.began or q.early), default=0)
    for i, queued in enumerate(queue):
        if i >= begun:
            unqueue(core, engine, out, queued)
            continue
        core._pool.unqueue(engine, queued)
        task = core.tasks[queued.task_id]
        core._finish(task, TaskState.FAILED, TaskError(reason, message=message), now, out)


def rebalance(core: ControlCore, out: list[Instruction]) -> None:
    """Idle engines take back what waits behind busy ones (no head-of-line blocking).

    A task queued behind a long one would otherwise wait for it while another
    engine idles: each idle engine withdraws one queued task that fits it (the last
    queued there, the least likely to have begun), behind the running task that
    started first. Nothing happens while every engine is busy (the usual case under
    load), so this costs nothing when pipelining pays.
    """
    if core._pool.pipeline_depth < 2:
        return
    idle = core._pool.dispatchable()
    if not idle:
        return
    queued: list[tuple[Engine, QueuedAttempt]] = []
    for engine in {e.id: e for e, _q in core._pool.queued()}.values():
        tail = core._pool.queue_of(engine)[-1]
        if engine.current_task is not None and not tail.withdrawing and tail.cancel is None:
            queued.append((engine, tail))
    queued.sort(key=lambda pair: core.tasks[pair[0].current_task or ""].start_time or 0.0)
    for engine, slot in queued:
        if not idle:
            return
        taker = choose_engine(core.tasks[slot.task_id].required_tags, idle)
        if taker is not None:
            withdraw(core, engine, out, slot)
            idle.remove(taker)


def reclaim_queued(core: ControlCore, out: list[Instruction]) -> None:
    """A waiting task of higher priority takes the place of a queued lower one.

    Each queued task of lower priority than a waiting task that fits its engine is
    withdrawn (the lowest first); it comes back to the queue and the place goes to
    the urgent task at the next dispatch.
    """
    candidates = [
        (engine, slot)
        for engine, slot in core._pool.queued()
        if not slot.withdrawing and slot.cancel is None
    ]
    for task_id in core._queue:
        if not candidates:
            return
        task = core.tasks[task_id]
        if task.priority <= min(core.tasks[slot.task_id].priority for _e, slot in candidates):
            return  # the queue is in priority order: nobody later outranks a queued task
        needed = frozenset(task.required_tags)
        fitting = [
            pair
            for pair in candidates
            if needed <= pair[0].tags and core.tasks[pair[1].task_id].priority < task.priority
        ]
        if fitting:
            worst = max(fitting, key=lambda pair: queue_key(core.tasks[pair[1].task_id]))
            withdraw(core, worst[0], out, worst[1])
            candidates.remove(worst)
