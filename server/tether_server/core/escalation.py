"""Escalation policy: the ladder's deadlines and how an interrupted task ends.

The ladder is SIGINT -> SIGTERM -> SIGKILL, each stage with its own grace period
(``InterruptRecord.grace``). A stage's deadline is an ``ESCALATE`` timer that
names the stage whose grace ran out; when it fires for the stage the task is
still in, the next rung is used. ``ControlCore`` does the bookkeeping; this
module holds the decisions, so that "how does an interrupt end" has one answer.
"""

from __future__ import annotations

from collections.abc import Mapping

from .model import (
    ErrorReason,
    EscalationStage,
    InterruptCause,
    InterruptRecord,
    TaskError,
    TaskState,
)

INTERRUPT_ENDINGS: Mapping[InterruptCause, tuple[TaskState, ErrorReason]] = {
    InterruptCause.USER: (TaskState.INTERRUPTED, ErrorReason.INTERRUPTED),
    InterruptCause.TIMEOUT: (TaskState.TIMED_OUT, ErrorReason.TIMED_OUT),
    InterruptCause.RESOURCE_LIMIT: (TaskState.INTERRUPTED, ErrorReason.RESOURCE_LIMIT),
    InterruptCause.SHUTDOWN: (TaskState.INTERRUPTED, ErrorReason.SHUTDOWN),
    InterruptCause.PREEMPTED: (TaskState.INTERRUPTED, ErrorReason.PREEMPTED),
}
"""Terminal state and error reason of a task that an interrupt stopped, by cause.

A timeout ends TIMED_OUT so that users can tell "too slow" from "stopped"; the
other causes end INTERRUPTED and the error reason says who wanted it. A PREEMPTED
ending is never final: the core queues the task again (it only names the attempt's end).
"""

SIGNALLED_STAGES = frozenset({EscalationStage.SIGINT, EscalationStage.SIGTERM})
"""Stages that are delivered as a signal the task can observe (SIGKILL kills the engine)."""


def deadline_stage(stage: EscalationStage) -> EscalationStage:
    """The stage whose deadline is running while an interrupt stands at ``stage``.

    The core sends SIGINT as it starts an interrupt (the engine holds it until the
    attempt begins) and a restore restarts an interrupt at SIGINT, so no interrupt of
    a running task stands at NONE; if one did, its SIGINT deadline would be running.
    """
    if stage is EscalationStage.NONE:
        return EscalationStage.SIGINT
    return stage


def interrupted_ending(
    record: InterruptRecord,
    *,
    final_stage: EscalationStage,
    error_type: str = "",
    traceback: str = "",
) -> tuple[TaskState, TaskError]:
    """How a task ends when the interrupt described by ``record`` stopped it at ``final_stage``."""
    state, reason = INTERRUPT_ENDINGS[record.cause]
    message = (
        f"stopped at stage {final_stage.name} after an interrupt by "
        f"{record.requested_by}: {record.reason}"
    )
    return state, TaskError(reason=reason, message=message, type=error_type, traceback=traceback)
