"""Inputs and outputs of the sans-IO control core (``core/machine.py``).

The controller turns everything that happens (an RPC, a reply from an engine, a
timer, a lost engine) into one of the *events* below and feeds it to
``ControlCore.handle(event)``, which updates the task and engine tables and
returns *instructions*: what the controller must now do in the world (dispatch a
task, signal an engine, start a timer, publish an event...). The core never does
I/O and never reads a clock: every event carries ``now``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .model import EscalationStage, GracePeriods, InterruptCause, Task


# --------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class TaskSubmitted:
    """A validated new task (state PENDING, id/seq/create_time set by the controller)."""

    task: Task
    now: float


@dataclass(frozen=True, slots=True)
class InterruptRequested:
    """Stop a task. ``grace`` overrides the task's grace periods when given."""

    task_id: str
    requested_by: str
    reason: str
    cause: InterruptCause
    now: float
    grace: GracePeriods | None = None


@dataclass(frozen=True, slots=True)
class EngineRegistered:
    """An engine joined the cluster; the controller now prepares it (state STARTING)."""

    engine_id: int
    now: float


@dataclass(frozen=True, slots=True)
class EngineReady:
    """The engine runtime is installed on the engine; it can take tasks."""

    engine_id: int
    host: str
    pid: int
    tags: frozenset[str]
    now: float


@dataclass(frozen=True, slots=True)
class EngineStartFailed:
    """A StartEngine instruction could not be carried out (no engine will register for it)."""

    now: float


@dataclass(frozen=True, slots=True)
class EngineLost:
    """The engine died or unregistered (nanny report, EngineError, or SIGKILL deadline)."""

    engine_id: int
    now: float


@dataclass(frozen=True, slots=True)
class ClusterLost:
    """The ipyparallel controller (hub) is gone: dead, frozen, or unreachable.

    Every engine went with it (their ids belong to the old hub and will be reused
    by the next one), so the core forgets them all; the tasks they ran end FAILED
    with CLUSTER_LOST. PENDING tasks stay queued for the cluster that comes back.
    """

    detail: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskProgressed:
    task_id: str
    attempt: int
    fraction: float
    message: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskOutput:
    task_id: str
    attempt: int
    chunk: str
    now: float


@dataclass(frozen=True, slots=True)
class TaskCheckpointed:
    """The task saved a checkpoint (the controller already stored its payload)."""

    task_id: str
    attempt: int
    now: float


class OutcomeStatus(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_STARTED = "not_started"
    """A queued attempt the engine did not start: withdrawn, or the engine is recycling."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the engine runtime returned for one attempt (see runtime ``run_task``)."""

    status: OutcomeStatus
    value: Any = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    stage: EscalationStage = EscalationStage.NONE
    """Which signal stopped the task (SIGINT or SIGTERM) when status is INTERRUPTED."""
    output: str | None = None
    """The whole (bounded) output as the engine saw it; replaces what the stream assembled."""
    output_truncated: bool = False
    resources: dict[str, Any] | None = None
    """ResourceReport fields as measured by the runtime (``reclaimed`` among them)."""
    seconds: float | None = None
    """How long the call of the task function took on the engine (``core.pace``)."""


@dataclass(frozen=True, slots=True)
class TaskFinished:
    task_id: str
    attempt: int
    outcome: Outcome
    now: float


@dataclass(frozen=True, slots=True)
class SignalDelivered:
    """The engine's nanny acknowledged one signal (it was delivered, not necessarily acted on)."""

    engine_id: int
    now: float


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: TimerKey
    now: float


@dataclass(frozen=True, slots=True)
class ResourceLimitExceeded:
    """A policy found the engine running (task_id, attempt) over a resource limit."""

    engine_id: int
    task_id: str
    attempt: int
    detail: str
    now: float


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """The engine answered a ``Withdraw``: True when the queued attempt will not start,
    False when it had already begun (it runs after the current one)."""

    engine_id: int
    task_id: str
    attempt: int
    withdrawn: bool
    now: float


@dataclass(frozen=True, slots=True)
class FoundAttempt:
    """One attempt a previous controller dispatched, as the hub's records and its engine
    tell it after a restart in attached mode (``reattach.py``)."""

    task_id: str
    attempt: int
    engine_id: int
    submitted: float
    """When the hub received it: the order of the attempts on one engine."""
    began: bool
    """False: the engine had not started it, and now never will (it was withdrawn)."""
    outcome: Outcome | None = None
    """Its result, when it ended while no controller listened; None while it runs."""


@dataclass(frozen=True, slots=True)
class Reattached:
    """Attached mode, after a restart: what became of the work the previous controller
    left on the cluster. Ends the reconciliation that ``restore(reattach=True)`` began:
    the core dispatches again."""

    found: tuple[FoundAttempt, ...]
    detail: str
    """Why nothing could be found ("" when the hub answered): the message of the
    CONTROLLER_RESTARTED failures."""
    now: float


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    """Stop dispatching; interrupt running tasks (cause SHUTDOWN), or with ``detach``
    (attached mode) leave them running on the cluster for the next controller."""

    now: float
    detach: bool = False


Event = (
    TaskSubmitted
    | InterruptRequested
    | EngineRegistered
    | EngineReady
    | EngineStartFailed
    | EngineLost
    | ClusterLost
    | TaskProgressed
    | TaskOutput
    | TaskCheckpointed
    | TaskFinished
    | SignalDelivered
    | Withdrawn
    | TimerFired
    | ResourceLimitExceeded
    | ShutdownRequested
    | Reattached
)


# --------------------------------------------------------------------------- timers
class TimerKind(enum.Enum):
    ESCALATE = "escalate"
    """End of the current stage's grace period for (task_id, attempt); ``stage`` is that stage."""
    TIMEOUT = "timeout"
    """The task's run-time limit for (task_id, attempt)."""
    QUEUE_TIMEOUT = "queue_timeout"
    """The task's queue limit (attempt 0)."""
    RETRY = "retry"
    """The backoff after the failed ``attempt`` is over: queue the task again."""
    PREEMPT_CHECK = "preempt_check"
    """A running task reached its minimum run time and may now be preempted (no task id)."""


@dataclass(frozen=True, slots=True)
class TimerKey:
    kind: TimerKind
    task_id: str
    attempt: int
    stage: EscalationStage = EscalationStage.NONE


# --------------------------------------------------------------------------- instructions
class EventKind(enum.Enum):
    """Kinds of log events. Values match ``tether.v1.TaskEventType``."""

    STATE_CHANGED = 2
    PROGRESS = 3
    OUTPUT = 4
    UPDATED = 5


@dataclass(frozen=True, slots=True)
class Publish:
    """Append one event to the log and fan it out. ``task`` is a snapshot (a copy)."""

    revision: int
    kind: EventKind
    task: Task
    time: float
    chunk: str = ""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run (task_id, attempt) on engine_id: at once when it was idle, or queued behind
    its running task (pipelined dispatch, the task stays PENDING until its turn)."""

    task_id: str
    attempt: int
    engine_id: int


@dataclass(frozen=True, slots=True)
class SignalEngine:
    """Send ``signal`` ("SIGINT" or "SIGTERM") to the engine running (task_id, attempt)."""

    engine_id: int
    signal: str
    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class KillEngine:
    """SIGKILL the engine (escalation or recycling). Its death comes back as EngineLost."""

    engine_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartEngine:
    """Start one engine to bring the pool back to its size (embedded mode only)."""

    replaces: int | None


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Ask engine_id not to start its queued (task_id, attempt); it answers ``Withdrawn``."""

    engine_id: int
    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StartTimer:
    key: TimerKey
    delay: float


@dataclass(frozen=True, slots=True)
class CancelTimers:
    """Every timer of this task is stale now (it reached a terminal state)."""

    task_id: str


Instruction = (
    Publish
    | Dispatch
    | SignalEngine
    | KillEngine
    | StartEngine
    | StartTimer
    | CancelTimers
    | Withdraw
)
