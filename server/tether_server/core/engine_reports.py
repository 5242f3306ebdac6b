"""What engines report, and what happens to a task when they do: it progressed, wrote
output, saved a checkpoint, finished (the engine's truth wins over a pending interrupt),
or died with its engine or with the whole cluster. Functions of ``ControlCore``, without
I/O. (An engine says nothing when a task starts: see ``runtime.attempts``.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from . import pipeline
from .escalation import SIGNALLED_STAGES, interrupted_ending
from .messages import (
    ClusterLost,
    EventKind,
    Instruction,
    Outcome,
    OutcomeStatus,
    TaskCheckpointed,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
)
from .model import Engine, EngineState, ErrorReason, EscalationStage, Task, TaskError, TaskState
from .records import bounded, resource_report

if TYPE_CHECKING:
    from .machine import ControlCore


def on_progressed(core: ControlCore, event: TaskProgressed, out: list[Instruction]) -> None:
    current = core._current(event.task_id, event.attempt)
    if current is None:
        return
    task = current[0]
    if math.isfinite(event.fraction):
        task.progress_fraction = min(1.0, max(0.0, event.fraction))
    task.progress_message = event.message
    out.append(core._publish(task, EventKind.PROGRESS, event.now))


def on_output(core: ControlCore, event: TaskOutput, out: list[Instruction]) -> None:
    current = core._current(event.task_id, event.attempt)
    if current is None or not event.chunk or current[0].output_truncated:
        return  # once cut, further output is dropped without an event
    task = current[0]
    kept = event.chunk[: max(0, core.max_output_chars - len(task.output))]
    task.output += kept
    task.output_truncated = len(kept) < len(event.chunk)
    out.append(core._publish(task, EventKind.OUTPUT, event.now, chunk=kept))


def on_checkpointed(core: ControlCore, event: TaskCheckpointed, out: list[Instruction]) -> None:
    current = core._current(event.task_id, event.attempt)
    if current is None:
        return
    task = current[0]
    task.has_checkpoint = True
    out.append(core._publish(task, EventKind.UPDATED, event.now))


def on_finished(core: ControlCore, event: TaskFinished, out: list[Instruction]) -> None:
    engine = core._pool.running(event.task_id, event.attempt)
    if engine is None:
        return  # stale: that attempt already ended (e.g. its engine was lost)
    task = core.tasks[event.task_id]
    if event.outcome.seconds is not None:
        core._pace.record(task.task, event.outcome.seconds)
    recycle = False
    if task.state.active and task.attempt == event.attempt:
        recycle = conclude(
            core, task, event.outcome, event.now, out, may_recycle=engine.state is EngineState.BUSY
        )
    core._pool.release(engine)
    if recycle:  # the runtime starts nothing more there: the queued task comes back
        out.append(core._pool.kill(engine, "resources not reclaimed"))
    else:  # not on its way to SIGKILL: the next queued one runs
        pipeline.settle(core, engine, event.now, out)
    core._dispatch(event.now, out)


def conclude(
    core: ControlCore,
    task: Task,
    outcome: Outcome,
    now: float,
    out: list[Instruction],
    *,
    may_recycle: bool,
) -> bool:
    """End the active ``task`` with its engine's ``outcome`` (its ending, output, resources,
    result); True when its engine is to be recycled (``may_recycle`` and the memory did
    not come back)."""
    state, error = ending(task, outcome)
    if outcome.output is not None:
        task.output, cut = bounded(outcome.output, core.max_output_chars)
        task.output_truncated = outcome.output_truncated or cut
    recycle = False
    if outcome.resources is not None:
        task.resources = resource_report(outcome.resources)
        recycle = may_recycle and not task.resources.reclaimed
        task.resources.engine_recycled = recycle
    if state is TaskState.SUCCEEDED:
        task.result = outcome.value
    core._finish(task, state, error, now, out)
    return recycle


def ending(task: Task, outcome: Outcome) -> tuple[TaskState, TaskError | None]:
    """The terminal state an outcome gives an active task: the engine's truth wins
    over a pending interrupt, whose record stays to say it was asked for."""
    if outcome.status is OutcomeStatus.SUCCEEDED:
        return TaskState.SUCCEEDED, None
    if outcome.status is OutcomeStatus.NOT_STARTED:  # the engine refused its turn
        message = f"the engine did not start the task: {outcome.error_message}"
        return TaskState.FAILED, TaskError(ErrorReason.ENGINE_LOST, message=message)
    record = task.interrupt
    if (
        outcome.status is OutcomeStatus.INTERRUPTED
        and task.state is TaskState.INTERRUPTING
        and record is not None
    ):
        stage = outcome.stage if outcome.stage in SIGNALLED_STAGES else record.stage
        record.final_stage = stage
        return interrupted_ending(
            record,
            final_stage=stage,
            error_type=outcome.error_type,
            traceback=outcome.traceback,
        )
    # FAILED, or a KeyboardInterrupt nobody asked for: the task raised.
    error = TaskError(
        ErrorReason.TASK_RAISED,
        message=outcome.error_message,
        type=outcome.error_type,
        traceback=outcome.traceback,
    )
    return TaskState.FAILED, error


def lose(core: ControlCore, engine: Engine, now: float, out: list[Instruction]) -> None:
    """The engine is gone: end its task and ask for a replacement. Idempotent."""
    if engine.state is EngineState.LOST:
        return
    message = f"engine {engine.id} was lost while the task ran"
    end_with_engine(core, engine, ErrorReason.ENGINE_LOST, message, now, out)
    pipeline.unqueue_lost(core, engine, ErrorReason.ENGINE_LOST, message, now, out)
    replacement = core._pool.mark_lost(engine, replace=not core._shutting_down)
    if replacement is not None:
        out.append(replacement)
    core._dispatch(now, out)  # a warm spare may have taken the engine's place


def on_cluster_lost(core: ControlCore, event: ClusterLost, out: list[Instruction]) -> None:
    """End what ran on the lost cluster and forget its engines; keep the queue."""
    message = f"the ipyparallel controller was lost while the task ran: {event.detail}"
    for engine in list(core.engines.values()):
        end_with_engine(core, engine, ErrorReason.CLUSTER_LOST, message, event.now, out)
        pipeline.unqueue_lost(core, engine, ErrorReason.CLUSTER_LOST, message, event.now, out)
    core._pool.clear()


def end_with_engine(
    core: ControlCore,
    engine: Engine,
    reason: ErrorReason,
    message: str,
    now: float,
    out: list[Instruction],
) -> None:
    """The engine's current task died with it: FAILED for ``reason``, or, when it was
    being interrupted, INTERRUPTED at stage SIGKILL (asked to stop, and it stopped:
    with its engine, the hardest way)."""
    task = core.tasks.get(engine.current_task) if engine.current_task else None
    if task is None or not task.state.active or task.attempt != engine.current_attempt:
        return
    record = task.interrupt
    if task.state is TaskState.INTERRUPTING and record is not None:
        record.final_stage = EscalationStage.SIGKILL
        state, error = interrupted_ending(record, final_stage=EscalationStage.SIGKILL)
    else:
        state, error = TaskState.FAILED, TaskError(reason, message=message)
    core._finish(task, state, error, now, out)
