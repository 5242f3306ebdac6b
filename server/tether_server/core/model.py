"""The domain model: tasks, engines and their vocabulary, free of any I/O.

Everything here is plain data. Protobuf conversion lives in ``tether_server.api``;
persistence in ``tether_server.store``. Times are POSIX seconds (floats).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

JSONValue = Any
"""A JSON-shaped value: None, bool, int, float, str, list or dict of those."""


class TaskState(enum.Enum):
    """Where a task is in its life. Values match ``tether.v1.TaskState``."""

    PENDING = 1
    RUNNING = 2
    INTERRUPTING = 3
    SUCCEEDED = 4
    FAILED = 5
    INTERRUPTED = 6
    TIMED_OUT = 7
    CANCELLED = 8

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """Running on an engine (RUNNING or INTERRUPTING)."""
        return self in (TaskState.RUNNING, TaskState.INTERRUPTING)


TERMINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.INTERRUPTED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
    }
)


class EscalationStage(enum.Enum):
    """A rung of the escalation ladder. Values match ``tether.v1.EscalationStage``."""

    NONE = 0
    SIGINT = 1
    SIGTERM = 2
    SIGKILL = 3
    DEQUEUED = 4


class InterruptCause(enum.Enum):
    """Why an interrupt was asked for. Values match ``tether.v1.InterruptCause``."""

    USER = 1
    TIMEOUT = 2
    RESOURCE_LIMIT = 3
    SHUTDOWN = 4
    PREEMPTED = 5
    """A higher-priority task needs the engine; the task is queued again (core/preemption.py)."""


class EngineState(enum.Enum):
    """What an engine is doing. Values match ``tether.v1.EngineState``."""

    STARTING = 1
    IDLE = 2
    BUSY = 3
    LOST = 4
    STOPPING = 5


class ErrorReason(enum.StrEnum):
    """Machine-readable reasons a task did not succeed (``TaskError.reason``)."""

    TASK_RAISED = "TASK_RAISED"
    INTERRUPTED = "INTERRUPTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    ENGINE_LOST = "ENGINE_LOST"
    CONTROLLER_RESTARTED = "CONTROLLER_RESTARTED"
    CLUSTER_LOST = "CLUSTER_LOST"
    """The ipyparallel controller (hub) died or stopped answering while the task ran."""
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    RESOURCE_LIMIT = "RESOURCE_LIMIT"
    UNKNOWN_TASK = "UNKNOWN_TASK"
    SHUTDOWN = "SHUTDOWN"
    PREEMPTED = "PREEMPTED"
    """Only on an attempt (``TaskAttempt.reason``): a preempted task never ends with it."""


@dataclass(frozen=True, slots=True)
class GracePeriods:
    """Seconds each escalation stage is given before the next one is used."""

    sigint: float = 2.0
    sigterm: float = 2.0
    sigkill: float = 5.0


@dataclass(slots=True)
class InterruptRecord:
    """Who asked for an interrupt, why, and how far the ladder went."""

    requested_by: str
    reason: str
    request_time: float
    cause: InterruptCause
    grace: GracePeriods
    stage: EscalationStage = EscalationStage.NONE
    final_stage: EscalationStage = EscalationStage.NONE


@dataclass(slots=True)
class TaskError:
    """Why a task did not succeed."""

    reason: ErrorReason
    message: str = ""
    type: str = ""
    traceback: str = ""


@dataclass(slots=True)
class ResourceReport:
    """What the engine runtime measured around a task (see runtime/resources.py)."""

    rss_before_bytes: int = 0
    rss_after_bytes: int = 0
    gpu_allocated_before_bytes: int = 0
    gpu_allocated_after_bytes: int = 0
    gpu_reserved_after_bytes: int = 0
    leftover_children: int = 0
    reclaimed: bool = True
    engine_recycled: bool = False
    summary: str = ""


class AttemptEnding(enum.Enum):
    """How one attempt ended. Values match ``tether.v1.AttemptEnding``."""

    RUNNING = 0
    FINAL = 1
    RETRIED = 2
    PREEMPTED = 3


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt runs again (see ``core/retry.py``). The default retries nothing."""

    max_attempts: int = 1
    """Attempts that may end in a retried failure, the first included (preemptions not counted)."""
    retry_on: frozenset[ErrorReason] = frozenset()
    initial_backoff: float = 1.0
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    """Each wait w becomes ``w * (1 + jitter * u)``, u uniform in [-1, 1]."""


@dataclass(slots=True)
class TaskAttempt:
    """One run of a task on an engine."""

    attempt: int
    engine_id: int | None
    start_time: float
    end_time: float | None = None
    ending: AttemptEnding = AttemptEnding.RUNNING
    reason: str = ""
    """An ``ErrorReason`` value, or "" when the attempt succeeded or still runs."""
    message: str = ""
    ended_by: str = ""
    """The preempting task's name for a preemption."""


@dataclass(slots=True)
class Task:
    """A task record. ``id`` is the bare id; the resource name is ``tasks/{id}``."""

    id: str
    task: str
    args: dict[str, JSONValue]
    owner: str = "anonymous"
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    state: TaskState = TaskState.PENDING
    engine_id: int | None = None
    attempt: int = 0
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    update_time: float = 0.0
    timeout: float | None = None
    queue_timeout: float | None = None
    grace: GracePeriods = field(default_factory=GracePeriods)
    progress_fraction: float = 0.0
    progress_message: str = ""
    output: str = ""
    output_truncated: bool = False
    interrupt: InterruptRecord | None = None
    result: JSONValue = None
    error: TaskError | None = None
    revision: int = 0
    resume_from: str = ""
    has_checkpoint: bool = False
    resources: ResourceReport | None = None
    required_tags: tuple[str, ...] = ()
    retry: RetryPolicy | None = None
    preemptible: bool = False
    attempts: list[TaskAttempt] = field(default_factory=list)
    """Every attempt, oldest first; the last is the current (or final) one."""
    seq: int = 0
    """Submission sequence number: FIFO order among equal priorities, and list order."""

    @property
    def name(self) -> str:
        return f"tasks/{self.id}"


@dataclass(slots=True)
class Engine:
    """An engine as the controller sees it."""

    id: int
    state: EngineState = EngineState.STARTING
    host: str = ""
    pid: int = 0
    tags: frozenset[str] = frozenset()
    current_task: str | None = None
    """Bare id of the task running on it."""
    current_attempt: int = 0
    tasks_done: int = 0
    register_time: float = 0.0
    last_seen: float = 0.0
    signals_in_flight: int = 0
    """Signals sent whose delivery the nanny has not acknowledged yet; no dispatch until 0."""
    spare: bool = False
    """A warm spare: ready, but given no task until an active engine is lost and it takes
    that engine's place (``--spare-engines``)."""
    queued_task: str | None = None
    """Bare id of the task queued behind the running one (pipelined dispatch); it stays
    PENDING until its turn."""
    queued_attempt: int = 0
    queued_count: int = 0
    """Tasks queued behind the running one (``queued_task`` is the first)."""
