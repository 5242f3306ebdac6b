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
  at its turn, as for a task that was not armed yet).
* **No head-of-line blocking.** An engine that is idle (nothing waits in the queue for
  it) withdraws a task queued behind a busy engine, the one behind the longest-running
  task first, and runs it.
* **Priority.** A waiting task of higher priority than a queued one that fits the same
  engine withdraws it (the lowest first) and takes its place at the next dispatch.
* **Losses.** An engine lost with a queued task: back to the queue if it had not begun,
  else it ended with the engine (ENGINE_LOST / CLUSTER_LOST).
"""

from __future__ import annotations

from typing import Protocol

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
    TaskStarted,
    Withdraw,
    Withdrawn,
)
from .model import (
    Engine,
    EngineState,
    ErrorReason,
    GracePeriods,
    InterruptCause,
    Task,
    TaskError,
    TaskState,
)
from .pool import EnginePool
from .records import InvariantViolation
from .scheduling import PendingQueue, choose_engine, queue_key

REPORTS = (TaskStarted, TaskProgressed, TaskOutput, TaskCheckpointed, TaskFinished)
"""Events an engine sends about one attempt; those of a queued attempt wait for its turn."""

SYSTEM = "system"
"""``requested_by`` of interrupts the controller starts itself (timeout, limits, shutdown)."""

SHUTDOWN_REASON = "the server is shutting down"


class _Core(Protocol):
    """What the pipeline needs of ``ControlCore``."""

    tasks: dict[str, Task]
    _pool: EnginePool
    _queue: PendingQueue
    _shutting_down: bool

    def handle(self, event: Event) -> list[Instruction]: ...

    def _dispatch(self, now: float, out: list[Instruction]) -> None: ...

    def _start(self, task: Task, engine: Engine, now: float, out: list[Instruction]) -> None: ...

    def _cancel_pending(
        self, task: Task, event: InterruptRequested, out: list[Instruction]
    ) -> None: ...

    def _finish(
        self,
        task: Task,
        state: TaskState,
        error: TaskError | None,
        now: float,
        out: list[Instruction],
    ) -> None: ...

    def _begin_interrupt(
        self,
        task: Task,
        requested_by: str,
        reason: str,
        cause: InterruptCause,
        grace: GracePeriods,
        now: float,
        out: list[Instruction],
    ) -> None: ...

    def _unqueue(self, engine: Engine, out: list[Instruction]) -> None: ...

    def _promote(self, engine: Engine, now: float, out: list[Instruction]) -> None: ...

    def _withdraw(self, engine: Engine, out: list[Instruction]) -> None: ...

    def _rebalance(self, out: list[Instruction]) -> None: ...


class PipelinedDispatch:
    """``ControlCore``'s methods for the task queued behind a running one."""

    def _hold(self: _Core, event: Event, out: list[Instruction]) -> bool:
        """Keep a report of a queued attempt for its turn; True when ``event`` was one."""
        assert isinstance(event, REPORTS)
        engine = self._pool.queued_on(event.task_id, event.attempt)
        if engine is None:
            return False
        if isinstance(event, TaskFinished) and event.outcome.status is OutcomeStatus.NOT_STARTED:
            self._unqueue(engine, out)  # withdrawn, or a recycled engine
            self._dispatch(event.now, out)
        else:
            slot = self._pool.slot(engine)
            assert slot is not None
            slot.early.append(event)
        return True

    def _queue_behind_running(
        self: _Core, plan: list[tuple[Task, Engine]], out: list[Instruction]
    ) -> None:
        """Queue each planned task behind its engine's running task."""
        for task, engine in plan:
            self._queue.remove(task.id)
            task.attempt += 1
            self._pool.queue_behind(engine, task)
            out.append(Dispatch(task.id, task.attempt, engine.id))

    def _promote(self: _Core, engine: Engine, now: float, out: list[Instruction]) -> None:
        """The running task ended: the queued one runs now (its early reports replayed)."""
        queued = self._pool.unqueue(engine)
        task = self.tasks[queued.task_id]
        if task.state is not TaskState.PENDING:
            raise InvariantViolation(f"queued task {task.id} is {task.state.name}")
        self._start(task, engine, now, out)
        cancel = queued.cancel
        if isinstance(cancel, InterruptRequested):  # asked while queued, too late to withdraw
            grace = cancel.grace or task.grace
            self._begin_interrupt(
                task, cancel.requested_by, cancel.reason, cancel.cause, grace, now, out
            )
        elif self._shutting_down:  # it had begun when the shutdown withdrew it
            cause = InterruptCause.SHUTDOWN
            self._begin_interrupt(task, SYSTEM, SHUTDOWN_REASON, cause, task.grace, now, out)
        for report in queued.early:
            out.extend(self.handle(report))  # type: ignore[arg-type]

    def _withdraw(self: _Core, engine: Engine, out: list[Instruction]) -> None:
        """Ask ``engine`` not to start its queued task (once)."""
        slot = self._pool.slot(engine)
        if slot is None or slot.withdrawing:
            return
        slot.withdrawing = True
        out.append(Withdraw(engine.id, slot.task_id, slot.attempt))

    def _on_withdrawn(self: _Core, event: Withdrawn, out: list[Instruction]) -> None:
        engine = self._pool.queued_on(event.task_id, event.attempt)
        slot = self._pool.slot(engine) if engine is not None else None
        if engine is None or slot is None or engine.id != event.engine_id:
            return  # it ended some other way meanwhile
        slot.withdrawing = False
        slot.began = not event.withdrawn
        if event.withdrawn:
            self._unqueue(engine, out)
        elif engine.current_task is None and engine.state is EngineState.IDLE:
            self._promote(engine, event.now, out)  # the running one ended
        self._dispatch(event.now, out)

    def _cancel_queued(
        self: _Core, task: Task, event: InterruptRequested, out: list[Instruction]
    ) -> bool:
        """An interrupt of a task queued on an engine: withdraw it, cancel on the answer.

        False when ``task`` is not queued on an engine (it waits in the core's queue).
        """
        engine = self._pool.queued_on(task.id, task.attempt)
        slot = self._pool.slot(engine) if engine is not None else None
        if engine is None or slot is None:
            return False
        slot.cancel = slot.cancel or event
        self._withdraw(engine, out)
        return True

    def _unqueue(self: _Core, engine: Engine, out: list[Instruction]) -> None:
        """The queued task will not start there: back to the queue, or CANCELLED if asked."""
        queued = self._pool.unqueue(engine)
        task = self.tasks[queued.task_id]
        if isinstance(queued.cancel, InterruptRequested):
            self._cancel_pending(task, queued.cancel, out)
        else:
            self._queue.push(task)

    def _unqueue_lost(
        self: _Core,
        engine: Engine,
        reason: ErrorReason,
        message: str,
        now: float,
        out: list[Instruction],
    ) -> None:
        """The engine is gone: its queued task goes back to the queue, unless it had begun."""
        slot = self._pool.slot(engine)
        if slot is None:
            return
        if not slot.began and not any(isinstance(report, TaskStarted) for report in slot.early):
            self._unqueue(engine, out)
            return
        task = self.tasks[slot.task_id]
        self._pool.unqueue(engine)
        self._finish(task, TaskState.FAILED, TaskError(reason, message=message), now, out)

    def _rebalance(self: _Core, out: list[Instruction]) -> None:
        """Idle engines take back what waits behind busy ones (no head-of-line blocking).

        A task queued behind a long one would otherwise wait for it while another
        engine idles: each idle engine withdraws one queued task that fits it, behind
        the running task that started first. Nothing happens while every engine is busy
        (the usual case under load), so this costs nothing when pipelining pays.
        """
        if self._pool.pipeline_depth < 2:
            return
        idle = self._pool.dispatchable()
        if not idle:
            return
        queued = [
            (engine, slot)
            for engine, slot in self._pool.queued()
            if not slot.withdrawing and slot.cancel is None and engine.current_task is not None
        ]

        queued.sort(key=lambda pair: self.tasks[pair[0].current_task or ""].start_time or 0.0)
        for engine, slot in queued:
            if not idle:
                return
            taker = choose_engine(self.tasks[slot.task_id].required_tags, idle)
            if taker is not None:
                self._withdraw(engine, out)
                idle.remove(taker)

    def _reclaim_queued(self: _Core, out: list[Instruction]) -> None:
        """A waiting task of higher priority takes the place of a queued lower one.

        Each queued task of lower priority than a waiting task that fits its engine is
        withdrawn (the lowest first); it comes back to the queue and the place goes to
        the urgent task at the next dispatch.
        """
        candidates = [
            (engine, self.tasks[slot.task_id])
            for engine, slot in self._pool.queued()
            if not slot.withdrawing and slot.cancel is None
        ]
        for task_id in self._queue:
            if not candidates:
                return
            task = self.tasks[task_id]
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
                self._withdraw(worst[0], out)
                candidates.remove(worst)
