"""The control core: tether's task and engine state machine, sans I/O.

``ControlCore.handle(event)`` takes one event (``core.messages``), updates the
task and engine tables, and returns the instructions the controller must carry
out, in order. It never does I/O and never reads a clock (every event carries
``now``), so every line of the interrupt contract is tested here without a
socket, an engine or a sleep.

Task transitions (anything not listed leaves the state alone; a terminal state
never changes, see ``records.LEGAL_TRANSITIONS``)::

    from          event                                      to
    ------------  -----------------------------------------  ---------------------------------
    (new)         TaskSubmitted                              PENDING (queued)
    PENDING       an IDLE engine with the tags, no signal    RUNNING (attempt += 1, Dispatch)
                  in flight, not shutting down
    PENDING       InterruptRequested                         CANCELLED  (final_stage DEQUEUED)
    PENDING       TimerFired(QUEUE_TIMEOUT)                  FAILED     (QUEUE_TIMEOUT)
    RUNNING       InterruptRequested / TimerFired(TIMEOUT) / INTERRUPTING (SIGINT now)
                  ResourceLimitExceeded / ShutdownRequested
    RUNNING       TaskFinished SUCCEEDED                     SUCCEEDED
    RUNNING       TaskFinished FAILED or INTERRUPTED         FAILED     (TASK_RAISED: nobody asked)
    RUNNING       EngineLost                                 FAILED     (ENGINE_LOST)
    RUNNING       ClusterLost                                FAILED     (CLUSTER_LOST)
    INTERRUPTING  TimerFired(ESCALATE, SIGINT)               INTERRUPTING, stage SIGTERM
    INTERRUPTING  TimerFired(ESCALATE, SIGTERM)              INTERRUPTING, stage SIGKILL (KillEngine)
    INTERRUPTING  TimerFired(ESCALATE, SIGKILL)              as EngineLost (death never confirmed)
    INTERRUPTING  TaskFinished SUCCEEDED / FAILED            SUCCEEDED / FAILED (the truth wins)
    INTERRUPTING  TaskFinished INTERRUPTED                   INTERRUPTED or TIMED_OUT by cause
    INTERRUPTING  EngineLost / ClusterLost                   INTERRUPTED or TIMED_OUT, final SIGKILL
    RUNNING, INTERRUPTING  restore() after a restart         FAILED     (CONTROLLER_RESTARTED)
                  (embedded mode: the cluster died too)
    RUNNING, INTERRUPTING  an ending its retry policy retries  PENDING (after a RETRY timer)
    INTERRUPTING  ending of an interrupt with cause PREEMPTED  PENDING (queued at once)
    RUNNING, INTERRUPTING  Reattached (attached mode, restarted)  RUNNING on its engine, its result,
                                                             or back to PENDING (core/restore.py)
    PENDING       a higher-priority task finds no engine     a victim RUNNING -> INTERRUPTING
                                                             (cause PREEMPTED, core/preemption.py)

Every dispatch opens a ``TaskAttempt``; every ending closes it (FINAL, RETRIED or
PREEMPTED). A retried or preempted task is the same task going back to PENDING:
it is dispatched like a new one, with attempt + 1, and the controller gives the
new attempt the task's last checkpoint.

Engines go STARTING (EngineRegistered) -> IDLE (EngineReady) <-> BUSY (Dispatch,
TaskFinished) -> STOPPING (KillEngine: escalation or recycling) -> LOST
(EngineLost). Signals stay on target: an engine is only signalled for the
(task, attempt) it runs, the signal names that attempt and the engine raises it for
no other, holding it until the attempt begins if need be (``runtime.attempts``), and
no task is dispatched to an engine while a signal to it is in flight.

With ``pipeline_depth`` N > 1 a BUSY engine also holds one task queued behind its
running one, and up to N - 1 when they are all short (still PENDING, ``attempt``
counted): see ``core/pipeline.py`` for their turns, their withdrawal (interrupts,
priority, shutdown) and their losses.

Every change to a task bumps its revision and yields one ``Publish`` carrying a
snapshot (a copy), which is what the event log and the subscribers see.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import assert_never

from . import engine_reports as reports
from . import pipeline, requeueing
from . import restore as restoring
from .errors import ShuttingDown, TaskAlreadyTerminal, TaskNotFound
from .escalation import deadline_stage
from .messages import (
    CancelTimers,
    ClusterLost,
    Dispatch,
    EngineLost,
    EngineReady,
    EngineRegistered,
    EngineStartFailed,
    Event,
    EventKind,
    Instruction,
    InterruptRequested,
    Publish,
    Reattached,
    ResourceLimitExceeded,
    ShutdownRequested,
    SignalDelivered,
    StartTimer,
    TaskCheckpointed,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    TaskSubmitted,
    TimerFired,
    TimerKey,
    TimerKind,
    Withdrawn,
)
from .model import (
    AttemptEnding,
    Engine,
    EngineState,
    ErrorReason,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    InterruptRecord,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from .pace import Pace
from .pipeline import SHUTDOWN_REASON, SYSTEM, Report
from .pool import EnginePool
from .preemption import Preemption
from .records import close_attempt, move, seconds, snapshot
from .scheduling import PendingQueue, plan_dispatch

ALREADY_ENDED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT})
"""States in which an interrupt is refused (TASK_ALREADY_TERMINAL). INTERRUPTED and
CANCELLED answer an interrupt idempotently instead: that is what was asked for."""


class ControlCore:
    """Tasks, engines and the pending queue of one controller, driven by events.

    The tables are public for reading (``tasks``, ``engines``); only ``handle``
    and ``restore`` change them. ``handle`` raises a domain error (TaskNotFound,
    TaskAlreadyTerminal, ShuttingDown) *before* changing anything, so a refused
    request leaves no trace.
    """

    def __init__(
        self,
        *,
        target_engines: int,
        replace_lost_engines: bool,
        default_grace: GracePeriods,
        spare_engines: int = 0,
        pipeline_depth: int = 1,
        first_revision: int = 1,
        max_output_chars: int = 1_000_000,
        preempt_min_runtime: float = 10.0,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        if first_revision < 1:
            raise ValueError("first_revision must be at least 1")
        if max_output_chars < 0:
            raise ValueError("max_output_chars must not be negative")
        self.default_grace = default_grace
        """Server-wide grace periods. Tasks carry their own (``Task.grace``, filled in
        by the controller at submit), so the core keeps this only to report it."""
        self.max_output_chars = max_output_chars
        self.tasks: dict[str, Task] = {}
        self._pool = EnginePool(
            target_engines=target_engines,
            replace_lost_engines=replace_lost_engines,
            spare_engines=spare_engines,
            pipeline_depth=pipeline_depth,
        )
        self._queue = PendingQueue()
        self._pace = Pace()
        """Recent run times of each task function: who may be queued several deep."""
        self._next_revision = first_revision
        self._shutting_down = False
        self.preempt_min_runtime = preempt_min_runtime
        """Seconds a task that was preempted runs before it may be preempted again."""
        self._uniform = uniform
        """Random source of the retry jitter (injected: deterministic in tests)."""
        self._preempting: dict[str, Preemption] = {}
        """Urgent task id -> the preemption freeing an engine for it."""
        self._preempt_check_at: float | None = None
        self._reconciling: restoring.Reconciliation | None = None
        """Attached mode after a restart: what waits for the controller's ``Reattached``."""

    # ------------------------------------------------------------------ views
    @property
    def engines(self) -> dict[int, Engine]:
        """Every engine ever seen, by id (LOST ones included)."""
        return self._pool.engines

    @property
    def next_revision(self) -> int:
        """The revision the next Publish will carry (one above the latest)."""
        return self._next_revision

    @property
    def queue_length(self) -> int:
        """PENDING tasks: in the queue, or queued behind a running task (not started)."""
        return len(self._queue) + self._pool.queued_count

    @property
    def running_count(self) -> int:
        """Tasks on an engine now (RUNNING or INTERRUPTING)."""
        return self._pool.running_count

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def requested_engine_starts(self) -> int:
        """StartEngine instructions whose engine has not registered yet."""
        return self._pool.requested_starts

    def withdrawal_pending(self, task_id: str) -> bool:
        """An interrupt of ``task_id`` waits for its engine to say whether it had begun."""
        if restoring.interrupt_deferred(self, task_id):
            return True  # it is applied when the restarted controller knows where the task is
        task = self.tasks.get(task_id)
        slot = self._pool.slot_of(task_id, task.attempt) if task is not None else None
        return slot is not None and slot.cancel is not None

    @property
    def reconciling(self) -> bool:
        """Attached mode after a restart: waiting for ``Reattached`` (nothing is dispatched)."""
        return self._reconciling is not None

    def unreconciled(self) -> list[Task]:
        """The restored tasks a re-attaching core waits to hear about (``Reattached``)."""
        rec = self._reconciling
        return [] if rec is None else [self.tasks[task_id] for task_id in sorted(rec.tasks)]

    def queued_task_ids(self) -> list[str]:
        """Pending task ids in the order they will be dispatched (tags permitting)."""
        return list(self._queue)

    # ------------------------------------------------------------------ entry points
    def handle(self, event: Event) -> list[Instruction]:
        """Apply one event; return what the controller must now do, in order."""
        out: list[Instruction] = []
        if isinstance(event, Report) and (
            restoring.hold(self, event) or pipeline.hold(self, event, out)
        ):
            return out
        match event:
            case TaskSubmitted():
                self._on_submitted(event, out)
            case InterruptRequested():
                self._on_interrupt_requested(event, out)
            case EngineRegistered():
                self._pool.register(event.engine_id, event.now)
            case EngineReady():
                self._on_engine_ready(event, out)
            case EngineStartFailed():
                # Forget the start, so a later loss can ask for a replacement again.
                self._pool.requested_starts = max(0, self._pool.requested_starts - 1)
            case EngineLost():
                engine = self.engines.get(event.engine_id)
                if engine is not None:
                    reports.lose(self, engine, event.now, out)
            case ClusterLost():
                reports.on_cluster_lost(self, event, out)
            case TaskProgressed():
                reports.on_progressed(self, event, out)
            case TaskOutput():
                reports.on_output(self, event, out)
            case TaskCheckpointed():
                reports.on_checkpointed(self, event, out)
            case TaskFinished():
                reports.on_finished(self, event, out)
            case SignalDelivered():
                if self._pool.acknowledge_signal(event.engine_id, event.now):
                    self._dispatch(event.now, out)
            case Withdrawn():
                pipeline.on_withdrawn(self, event, out)
            case TimerFired():
                self._on_timer(event.key, event.now, out)
            case ResourceLimitExceeded():
                self._on_resource_limit(event, out)
            case ShutdownRequested():
                self._on_shutdown(event.now, out, detach=event.detach)
            case Reattached():
                restoring.on_reattached(self, event, out)
            case _:
                assert_never(event)
        return out

    def forget(self, task_id: str) -> bool:
        """Drop a terminal task from the table (memory holds live work only).

        The controller calls this once the task's terminal record is durable, and
        serves it from its cache and the store from then on. Live tasks are never
        forgotten; returns whether the task was dropped.
        """
        task = self.tasks.get(task_id)
        if task is None or not task.state.terminal:
            return False
        del self.tasks[task_id]
        return True

    def restore(
        self, tasks: Iterable[Task], now: float, *, reattach: bool = False
    ) -> list[Instruction]:
        """Load the task table of a restarted controller; call once, on a fresh core.

        PENDING tasks are queued again in their old order, their queue timeout counting
        from ``create_time``. RUNNING and INTERRUPTING tasks died with an embedded
        cluster: they end FAILED (CONTROLLER_RESTARTED). With ``reattach`` (an attached
        cluster outlived the controller) nothing is dispatched until ``Reattached`` says
        what became of them (``core/restore.py``).
        """
        return restoring.restore(self, tasks, now, reattach=reattach)

    # ------------------------------------------------------------------ requests
    def _on_submitted(self, event: TaskSubmitted, out: list[Instruction]) -> None:
        task = event.task
        if self._shutting_down:
            raise ShuttingDown("the server is shutting down and accepts no new tasks")
        if task.id in self.tasks:
            raise ValueError(f"task {task.id!r} was already submitted")
        if task.state is not TaskState.PENDING:
            raise ValueError(f"a submitted task must be PENDING, not {task.state.name}")
        self.tasks[task.id] = task
        self._queue.push(task)
        out.append(self._publish(task, EventKind.STATE_CHANGED, event.now))
        if task.queue_timeout is not None:
            out.append(_queue_timer(task, task.queue_timeout))
        self._dispatch(event.now, out)

    def _on_interrupt_requested(self, event: InterruptRequested, out: list[Instruction]) -> None:
        task = self.tasks.get(event.task_id)
        if task is None:
            name = f"tasks/{event.task_id}"
            raise TaskNotFound(f"task {name} does not exist", metadata={"name": name})
        if task.state in ALREADY_ENDED:
            raise TaskAlreadyTerminal(
                f"task {task.name} already ended {task.state.name}; there is nothing to interrupt",
                metadata={"name": task.name, "state": f"TASK_STATE_{task.state.name}"},
            )
        if restoring.defer_interrupt(self, event):
            return  # where the task is (queued on an engine, running, ended) is not known yet
        grace = event.grace or task.grace
        if task.state is TaskState.PENDING:
            if not pipeline.cancel_queued(self, task, event, out):
                self._queue.remove(task.id)
                self._cancel_pending(task, event, out)
        elif task.state is TaskState.RUNNING:
            self._begin_interrupt(
                task, event.requested_by, event.reason, event.cause, grace, event.now, out
            )
        elif (
            task.state is TaskState.INTERRUPTING
            and task.interrupt is not None
            and task.interrupt.cause is InterruptCause.PREEMPTED
            and event.cause is not InterruptCause.PREEMPTED
        ):
            # Being preempted, now asked to stop for good: it ends instead of requeueing.
            task.interrupt.requested_by = event.requested_by
            task.interrupt.reason = event.reason
            task.interrupt.cause = event.cause
            out.append(self._publish(task, EventKind.UPDATED, event.now))
        # INTERRUPTING, INTERRUPTED, CANCELLED: already what was asked for.

    def _cancel_pending(
        self, task: Task, event: InterruptRequested, out: list[Instruction]
    ) -> None:
        """A task that never started is CANCELLED (final stage DEQUEUED)."""
        task.interrupt = InterruptRecord(
            event.requested_by,
            event.reason,
            event.now,
            event.cause,
            event.grace or task.grace,
            final_stage=EscalationStage.DEQUEUED,
        )
        message = f"cancelled before it started by {event.requested_by}: {event.reason}"
        error = TaskError(ErrorReason.CANCELLED, message=message)
        self._finish(task, TaskState.CANCELLED, error, event.now, out)

    def _begin_interrupt(
        self,
        task: Task,
        requested_by: str,
        reason: str,
        cause: InterruptCause,
        grace: GracePeriods,
        now: float,
        out: list[Instruction],
    ) -> None:
        """RUNNING -> INTERRUPTING, SIGINT now.

        The engine raises it in the attempt, or holds it until the attempt begins; the
        SIGINT deadline runs either way, so a task that never begins (stuck in
        unpickling, an engine that hangs) is still escalated.
        """
        engine = self._pool.engine_of(task)
        pipeline.withdraw(self, engine, out)  # an engine being stopped keeps nothing queued
        task.interrupt = InterruptRecord(requested_by, reason, now, cause, grace)
        task.interrupt.stage = EscalationStage.SIGINT
        move(task, TaskState.INTERRUPTING)
        out.append(self._publish(task, EventKind.STATE_CHANGED, now))
        out.append(self._pool.signal(engine, task, EscalationStage.SIGINT))
        out.append(_escalation_timer(task, EscalationStage.SIGINT, grace.sigint))

    def _on_shutdown(self, now: float, out: list[Instruction], *, detach: bool) -> None:
        """Stop dispatching and interrupt what runs. PENDING tasks stay PENDING: they are
        kept in the store and run after a restart. ``detach``: what runs goes on (the
        next controller re-attaches to it, ``core/restore.py``)."""
        self._shutting_down = True
        for engine, queued in self._pool.queued():
            pipeline.withdraw(self, engine, out, queued)  # back to the queue: kept PENDING
        if detach:
            return
        for engine in list(self.engines.values()):
            task = self.tasks.get(engine.current_task) if engine.current_task else None
            if task is not None and task.state is TaskState.RUNNING:
                cause = InterruptCause.SHUTDOWN
                self._begin_interrupt(task, SYSTEM, SHUTDOWN_REASON, cause, task.grace, now, out)

    def _on_resource_limit(self, event: ResourceLimitExceeded, out: list[Instruction]) -> None:
        current = self._current(event.task_id, event.attempt)
        if current is None or current[1].id != event.engine_id:
            return
        task = current[0]
        if task.state is TaskState.RUNNING:
            cause = InterruptCause.RESOURCE_LIMIT
            self._begin_interrupt(task, SYSTEM, event.detail, cause, task.grace, event.now, out)

    # ------------------------------------------------------------------ engine reports
    def _on_engine_ready(self, event: EngineReady, out: list[Instruction]) -> None:
        engine = self._pool.register(event.engine_id, event.now)
        if engine.state is not EngineState.STARTING and engine.id not in self._pool.unready:
            return
        self._pool.ready(engine)
        engine.host, engine.pid, engine.tags = event.host, event.pid, event.tags
        engine.last_seen = event.now
        self._dispatch(event.now, out)

    # ------------------------------------------------------------------ timers
    def _on_timer(self, key: TimerKey, now: float, out: list[Instruction]) -> None:
        if key.kind is TimerKind.RETRY:
            requeueing.on_retry_timer(self, key, now, out)
            return
        if key.kind is TimerKind.PREEMPT_CHECK:
            requeueing.on_preempt_check(self, now, out)
            return
        if key.kind is TimerKind.QUEUE_TIMEOUT:
            task = self.tasks.get(key.task_id)
            if task is None or task.state is not TaskState.PENDING or task.attempt != key.attempt:
                return
            self._queue.remove(task.id)
            message = f"waited more than {seconds(task.queue_timeout)} for an engine"
            error = TaskError(ErrorReason.QUEUE_TIMEOUT, message=message)
            self._finish(task, TaskState.FAILED, error, now, out)
            return
        current = self._current(key.task_id, key.attempt)
        if current is None:
            return
        task, engine = current
        if key.kind is TimerKind.TIMEOUT:
            if task.state is TaskState.RUNNING:
                reason = f"timeout after {seconds(task.timeout)}"
                cause = InterruptCause.TIMEOUT
                self._begin_interrupt(task, SYSTEM, reason, cause, task.grace, now, out)
            return
        record = task.interrupt
        if (
            task.state is not TaskState.INTERRUPTING
            or record is None
            or key.stage is not deadline_stage(record.stage)
        ):
            return  # the deadline of a stage already left behind
        if key.stage is EscalationStage.SIGINT:
            record.stage = EscalationStage.SIGTERM
            out.append(self._publish(task, EventKind.UPDATED, now))
            out.append(self._pool.signal(engine, task, EscalationStage.SIGTERM))
            out.append(_escalation_timer(task, EscalationStage.SIGTERM, record.grace.sigterm))
        elif key.stage is EscalationStage.SIGTERM:
            record.stage = EscalationStage.SIGKILL
            reason = f"{task.name} still ran {seconds(record.grace.sigterm)} after SIGTERM"
            kill = self._pool.kill(engine, reason)
            out.append(self._publish(task, EventKind.UPDATED, now))
            out.append(kill)
            out.append(_escalation_timer(task, EscalationStage.SIGKILL, record.grace.sigkill))
        elif key.stage is EscalationStage.SIGKILL:
            reports.lose(self, engine, now, out)  # the engine never confirmed its death

    # ------------------------------------------------------------------ helpers
    def _dispatch(self, now: float, out: list[Instruction]) -> None:
        """Put queued tasks on idle engines that have no signal in flight."""
        if self._shutting_down or self._reconciling is not None:
            return
        if self._queue:
            for task, engine in plan_dispatch(self._queue, self.tasks, self._pool.dispatchable()):
                self._queue.remove(task.id)
                task.attempt += 1
                self._start(task, engine, now, out)
                out.append(Dispatch(task.id, task.attempt, engine.id))
        pipeline.rebalance(self, out)  # an idle engine takes what waits behind a busy one
        if not self._queue:
            return
        # An urgent task that found no idle engine frees one by preemption, and then waits
        # for that engine rather than being queued behind another running task.
        requeueing.preempt(self, now, out)
        # Pipelined dispatch: more behind each running task that is not being stopped.
        behind = [
            engine
            for engine in self._pool.queueable()
            if self.tasks[engine.current_task or ""].state is TaskState.RUNNING
            and pipeline.room(self, engine) > 0
        ]
        if behind:
            pipeline.queue_behind_running(self, behind, out)
        if self._queue:
            pipeline.reclaim_queued(self, out)

    def _start(self, task: Task, engine: Engine, now: float, out: list[Instruction]) -> None:
        """PENDING -> RUNNING on ``engine`` (the attempt was counted at dispatch)."""
        move(task, TaskState.RUNNING)
        task.engine_id = engine.id
        task.start_time = now
        self._pool.assign(engine, task)
        task.attempts.append(TaskAttempt(task.attempt, engine.id, now))
        self._preempting.pop(task.id, None)
        out.append(self._publish(task, EventKind.STATE_CHANGED, now))
        if task.timeout is not None:
            key = TimerKey(TimerKind.TIMEOUT, task.id, task.attempt)
            out.append(StartTimer(key, task.timeout))

    def _current(self, task_id: str, attempt: int) -> tuple[Task, Engine] | None:
        """The active task and its engine, when ``attempt`` is the task's current one."""
        task = self.tasks.get(task_id)
        if task is None or task.attempt != attempt or not task.state.active:
            return None
        if self._reconciling is not None and task_id in self._reconciling.tasks:
            return None  # not on an engine of this controller yet
        return task, self._pool.engine_of(task)

    def _finish(
        self,
        task: Task,
        state: TaskState,
        error: TaskError | None,
        now: float,
        out: list[Instruction],
    ) -> None:
        """Move to a terminal state: the one place that publishes an end and cancels timers.

        An active task whose ending its retry policy retries, or that was preempted,
        goes back to PENDING instead (``requeueing.requeue``).
        """
        if (
            task.state.active
            and error is not None
            and requeueing.requeue(self, task, error, now, out)
        ):
            return
        close_attempt(task, AttemptEnding.FINAL, error, now)
        self._preempting.pop(task.id, None)
        move(task, state)
        task.error = error
        task.end_time = now
        out.append(self._publish(task, EventKind.STATE_CHANGED, now))
        out.append(CancelTimers(task.id))

    def _publish(self, task: Task, kind: EventKind, now: float, chunk: str = "") -> Publish:
        """Stamp the change on the task (revision, update_time) and describe it."""
        revision = self._next_revision
        self._next_revision += 1
        task.revision = revision
        task.update_time = now
        keep_output = kind is EventKind.STATE_CHANGED and task.state.terminal
        return Publish(revision, kind, snapshot(task, keep_output=keep_output), now, chunk)


def _queue_timer(task: Task, delay: float) -> StartTimer:
    return StartTimer(TimerKey(TimerKind.QUEUE_TIMEOUT, task.id, task.attempt), delay)


def _escalation_timer(task: Task, stage: EscalationStage, delay: float) -> StartTimer:
    return StartTimer(TimerKey(TimerKind.ESCALATE, task.id, task.attempt, stage), delay)
