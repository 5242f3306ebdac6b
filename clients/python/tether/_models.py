"""The types users of the client see: enums and frozen dataclasses.

They mirror the messages of ``tether.v1`` but are plain Python: timestamps are
aware ``datetime`` objects in UTC, durations are ``timedelta``, JSON-shaped values
are ``dict``/``list``/``str``/``int``/``float``/``bool``/``None``, and enum members
drop the proto prefix (``TaskState.RUNNING``, not ``TASK_STATE_RUNNING``).

Each converted message keeps the protobuf it came from in ``raw`` for the rare
caller that needs a field this module does not expose yet. Converting from
protobuf lives in ``tether._convert``; this module imports the generated code
only to name the types of those ``raw`` attributes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tether.v1 import cluster_service_pb2, task_pb2, task_service_pb2

__all__ = [
    "AttemptEnding",
    "Checkpoint",
    "Cluster",
    "ClusterMode",
    "Engine",
    "EngineState",
    "EscalationStage",
    "GracePeriods",
    "InterruptCause",
    "InterruptRecord",
    "Progress",
    "ResourceReport",
    "ServerLimits",
    "Task",
    "TaskAttempt",
    "TaskError",
    "TaskEvent",
    "TaskEventType",
    "TaskFilter",
    "TaskRetryPolicy",
    "TaskState",
    "TaskView",
]


class TaskState(enum.Enum):
    """Where a task is in its life. Terminal states never change.

    ``PENDING -> RUNNING -> {SUCCEEDED, FAILED, INTERRUPTED, TIMED_OUT}``,
    ``PENDING -> CANCELLED`` (interrupted before it started) and
    ``RUNNING -> INTERRUPTING -> INTERRUPTED`` (or SUCCEEDED/FAILED when the task
    finished before the interrupt landed).
    """

    UNSPECIFIED = 0
    """Not set; also used for a state this client version does not know yet."""
    PENDING = 1
    """Accepted and queued in the controller; not yet on an engine."""
    RUNNING = 2
    """Running on an engine."""
    INTERRUPTING = 3
    """An interrupt was asked for and the escalation ladder is in progress."""
    SUCCEEDED = 4
    """Finished and returned a result. Terminal."""
    FAILED = 5
    """Raised an error, or its engine was lost. Terminal."""
    INTERRUPTED = 6
    """Stopped by an interrupt while it ran. Terminal."""
    TIMED_OUT = 7
    """Stopped because it ran past its timeout. Terminal."""
    CANCELLED = 8
    """Interrupted before it started; it never ran. Terminal."""

    @property
    def is_terminal(self) -> bool:
        """True for the states a task never leaves."""
        return self in _TERMINAL_STATES


_TERMINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.INTERRUPTED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
    }
)


class EscalationStage(enum.Enum):
    """A stage of the ladder the controller climbs to stop a running task."""

    UNSPECIFIED = 0
    """No stage: the task was not stopped by a signal."""
    SIGINT = 1
    """``KeyboardInterrupt`` inside the task; cleanup hooks run; the engine stays."""
    SIGTERM = 2
    """A harder exception inside the task; cleanup hooks run; the engine stays."""
    SIGKILL = 3
    """The engine process was killed and a replacement started."""
    DEQUEUED = 4
    """Stopped without a signal (it was queued, or its engine was already gone)."""


class InterruptCause(enum.Enum):
    """Why an interrupt happened."""

    UNSPECIFIED = 0
    """Not set."""
    USER = 1
    """A client asked for it (``InterruptTask``)."""
    TIMEOUT = 2
    """The task ran past its timeout."""
    RESOURCE_LIMIT = 3
    """The task's engine exceeded a configured resource limit."""
    SHUTDOWN = 4
    """The server is shutting down."""
    PREEMPTED = 5
    """A higher-priority task needed the engine; the task is queued again and resumes."""


class AttemptEnding(enum.Enum):
    """How one attempt of a task ended."""

    UNSPECIFIED = 0
    """The attempt still runs."""
    FINAL = 1
    """The task ended with this attempt; the task's state and error say how."""
    RETRIED = 2
    """The attempt failed with a reason the retry policy retries; another attempt follows."""
    PREEMPTED = 3
    """A higher-priority task preempted it; the task was queued again and resumes."""


class TaskEventType(enum.Enum):
    """What kind of change a :class:`TaskEvent` reports."""

    UNSPECIFIED = 0
    """Not set."""
    SNAPSHOT = 1
    """The current state of a task (initial state, or after a re-list)."""
    STATE_CHANGED = 2
    """The task's state changed (submitted, started, interrupting, ended...)."""
    PROGRESS = 3
    """The task reported progress."""
    OUTPUT = 4
    """The task emitted a piece of output (see :attr:`TaskEvent.output_chunk`)."""
    UPDATED = 5
    """Something else changed (escalation stage, checkpoint, resources)."""


class TaskView(enum.Enum):
    """How much of a task the server returns."""

    UNSPECIFIED = 0
    """The server's default for the call."""
    BASIC = 1
    """Everything but the result and the error traceback."""
    FULL = 2
    """The whole task, result and traceback included."""


class EngineState(enum.Enum):
    """What an ipyparallel engine is doing."""

    UNSPECIFIED = 0
    """Not set."""
    STARTING = 1
    """Registered, being prepared, not yet accepting tasks."""
    IDLE = 2
    """Ready and without a task."""
    BUSY = 3
    """Running a task."""
    LOST = 4
    """Dead or unregistered."""
    STOPPING = 5
    """Being killed by the controller (escalation or recycling)."""


class ClusterMode(enum.Enum):
    """How the controller owns its cluster."""

    UNSPECIFIED = 0
    """Not set."""
    EMBEDDED = 1
    """The server started the cluster; lost engines are replaced."""
    ATTACHED = 2
    """The server attached to a cluster it does not own; lost engines are reported."""


@dataclass(frozen=True)
class GracePeriods:
    """Time each stage of the escalation ladder gets before the next one.

    ``None`` leaves a stage at the server's default (or the task's setting, for an
    interrupt).
    """

    sigint: timedelta | None = None
    """Time after SIGINT before SIGTERM is sent."""
    sigterm: timedelta | None = None
    """Time after SIGTERM before SIGKILL is sent."""
    sigkill: timedelta | None = None
    """Time after SIGKILL to wait for the engine's death to be confirmed."""


@dataclass(frozen=True)
class Progress:
    """The latest progress report of a running task (``ctx.progress``)."""

    fraction: float
    """Completed fraction in [0, 1]."""
    message: str
    """Free-form message, e.g. ``"token 12 of 256"``."""


@dataclass(frozen=True)
class InterruptRecord:
    """Who asked to stop a task, why, and which stage of the ladder ended it."""

    requested_by: str
    """Principal that asked (``"system"`` for timeouts and policies)."""
    reason: str
    """Free-form reason given with the request."""
    request_time: datetime | None
    """When the interrupt was asked for."""
    cause: InterruptCause
    """Why the interrupt happened."""
    stage: EscalationStage
    """The highest stage used so far."""
    final_stage: EscalationStage
    """The stage that ended the task; UNSPECIFIED while in progress or when the task ended first."""
    grace: GracePeriods
    """Grace periods in effect for this interrupt."""


@dataclass(frozen=True)
class TaskError:
    """Why a task did not succeed."""

    reason: str
    """Machine-readable reason: TASK_RAISED, INTERRUPTED, TIMED_OUT, CANCELLED, ENGINE_LOST, ..."""
    type: str
    """Python exception type name, e.g. ``"ValueError"`` (empty when none was involved)."""
    message: str
    """Human-readable message."""
    traceback: str
    """Formatted traceback from the engine (only in the FULL view)."""


@dataclass(frozen=True)
class ResourceReport:
    """Resources the engine reported around a task."""

    rss_before_bytes: int
    rss_after_bytes: int
    gpu_allocated_before_bytes: int
    gpu_allocated_after_bytes: int
    gpu_reserved_after_bytes: int
    leftover_children: int
    """Child processes still alive after the task (they are killed)."""
    reclaimed: bool
    """True when memory came back within the configured tolerance and no child was left."""
    engine_recycled: bool
    """True when the controller replaced the engine because of this report."""
    summary: str


@dataclass(frozen=True)
class TaskRetryPolicy:
    """When a failed attempt of a task runs again (``submit(retry=...)``).

    A retried attempt is the same task with ``attempt + 1``; it resumes from the
    task's last checkpoint. A user's interrupt is never retried. Zero values and
    ``None`` take the server's defaults (``jitter`` 0 means no jitter).
    """

    max_attempts: int = 3
    """Attempts that may end in a retried failure, the first run included (at most 100)."""
    retry_on: tuple[str, ...] = ()
    """Reasons retried, among ENGINE_LOST, CLUSTER_LOST, RESOURCE_LIMIT, TASK_RAISED,
    TIMED_OUT; empty: ENGINE_LOST and CLUSTER_LOST."""
    initial_backoff: timedelta | None = None
    """Wait before the first retry."""
    max_backoff: timedelta | None = None
    """Longest wait between two attempts."""
    backoff_multiplier: float = 0.0
    """Growth of the wait per retry (at least 1; 0: the server's default)."""
    jitter: float = 0.0
    """Random spread of each wait, a fraction in [0, 1]."""


@dataclass(frozen=True)
class TaskAttempt:
    """One run of a task on an engine."""

    attempt: int
    """The attempt number, 1 for the first run."""
    engine_id: int | None
    start_time: datetime | None
    end_time: datetime | None
    """None while the attempt runs."""
    ending: AttemptEnding
    reason: str
    """Why it did not succeed (a TaskError reason, or PREEMPTED); empty otherwise."""
    message: str
    ended_by: str
    """The preempting task's name, for a preemption."""


@dataclass(frozen=True)
class Task:
    """A unit of work: one call of a registered task on one engine.

    ``args``, ``labels`` and ``result`` are plain containers; they are left out of
    hashing, so tasks hash by their scalar fields (name and revision identify one
    version of a task).
    """

    name: str
    """Resource name, ``"tasks/{id}"``."""
    task: str
    """The registered task, e.g. ``"demo.sleep"``."""
    args: Mapping[str, Any] = field(hash=False)
    """JSON-shaped keyword arguments."""
    state: TaskState
    labels: Mapping[str, str] = field(hash=False)
    priority: int
    engine_id: int | None
    """Engine that runs (or ran) the task; None until dispatched. Engine 0 exists."""
    attempt: int
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    update_time: datetime | None
    timeout: timedelta | None
    """Run-time limit from start to end; None: no limit."""
    queue_timeout: timedelta | None
    """Time the task may wait in the queue; None: no limit."""
    grace: GracePeriods
    progress: Progress | None
    output: str
    """Partial output emitted so far (bounded by the server's limit)."""
    output_truncated: bool
    interrupt: InterruptRecord | None
    """Set once an interrupt was asked for."""
    result: Any = field(hash=False)
    """The JSON-decoded return value; only set when SUCCEEDED and fetched in the FULL view."""
    error: TaskError | None
    """Why the task did not succeed; set for FAILED, INTERRUPTED, TIMED_OUT, CANCELLED."""
    revision: int
    """Revision of the controller's event log at the task's last change."""
    owner: str
    resume_from: str
    """Task whose last checkpoint this task resumes from, or ``""``."""
    has_checkpoint: bool
    resources: ResourceReport | None
    required_tags: tuple[str, ...]
    retry: TaskRetryPolicy | None
    """The retry policy in effect (the request's or the server's); None: no retry."""
    preemptible: bool
    """Whether a higher-priority task may preempt this one (it then resumes later)."""
    attempts: tuple[TaskAttempt, ...]
    """Every attempt so far, oldest first; the last is the current or final one."""
    raw: task_pb2.Task = field(repr=False, compare=False, hash=False)
    """The protobuf this task was converted from."""

    @property
    def id(self) -> str:
        """The id part of the name: ``"tasks/abc"`` -> ``"abc"``."""
        return self.name.removeprefix("tasks/")


@dataclass(frozen=True)
class TaskEvent:
    """One change to a task, as delivered by a watch.

    ``resume_token`` is the position of this event in the stream: hand it to
    ``watch(resume_token=...)`` to continue strictly after it.
    """

    type: TaskEventType
    task: Task
    """The task after the change. OUTPUT events carry the chunk in ``output_chunk``."""
    event_time: datetime | None
    output_chunk: str
    """The new piece of output, on OUTPUT events."""
    revision: int
    """Revision of this event in the controller's log; strictly increasing on a stream."""
    resume_token: str
    raw: task_service_pb2.TaskEvent | None = field(repr=False, compare=False, hash=False)
    """The protobuf event; None for SNAPSHOT events the client built from a listing (after
    a re-list, and the first event of a ``TaskHandle.watch``)."""


@dataclass(frozen=True)
class Checkpoint:
    """A stream position where nothing matching changed (only yielded when asked for)."""

    revision: int
    initial_state_complete: bool
    """True on the checkpoint that ends the initial SNAPSHOT events."""
    time: datetime | None
    resume_token: str


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks a list or a watch covers. Empty fields match everything; set fields must all match."""

    states: Sequence[TaskState] = ()
    """Match tasks in any of these states."""
    tasks: Sequence[str] = ()
    """Match tasks of any of these registered task names."""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Match tasks carrying all of these labels with these values."""
    names: Sequence[str] = ()
    """Match tasks with any of these names, ``"tasks/{id}"`` (at most 1,000). A watch of
    names sees every event of those tasks, as ``TaskHandle.watch`` does, but never ends."""

    def __post_init__(self) -> None:
        # Keep the filter immutable (and hashable) whatever sequences it was given.
        object.__setattr__(self, "states", tuple(self.states))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "names", tuple(self.names))


@dataclass(frozen=True)
class Engine:
    """One ipyparallel engine of the cluster."""

    id: int
    host: str
    pid: int
    state: EngineState
    current_task: str
    """Name of the task it runs, ``""`` when idle."""
    tasks_done: int
    last_seen: datetime | None
    register_time: datetime | None
    tags: tuple[str, ...]
    raw: cluster_service_pb2.Engine = field(repr=False, compare=False, hash=False)
    spare: bool = False
    """A warm spare: ready, given no task until it takes a lost engine's place."""
    queued_task: str = ""
    """Name of the task queued behind the running one (pipelined dispatch), ``""`` if none."""
    queued_tasks: int = 0
    """How many tasks are queued behind the running one (``queued_task`` is the first)."""


@dataclass(frozen=True)
class Model:
    """A model ``llm.generate`` can run (its ``model`` argument)."""

    name: str
    kind: str
    """``"hf"`` (a checkpoint the operator configured) or ``"builtin"`` (the demo sizes)."""
    context_length: int
    """Prompt tokens + ``max_tokens`` may not exceed it."""
    chat: bool
    """The model has a chat template, so ``llm.generate`` accepts ``messages``."""


@dataclass(frozen=True)
class ServerLimits:
    """Limits the server enforces on requests."""

    max_args_bytes: int
    max_grace: timedelta | None
    max_timeout: timedelta | None
    max_output_bytes: int
    max_page_size: int
    max_labels: int


@dataclass(frozen=True)
class Cluster:
    """The cluster behind the control plane: its engines, queue and limits."""

    engines: tuple[Engine, ...]
    mode: ClusterMode
    target_size: int
    degraded: bool
    """True when fewer engines are usable than ``target_size``."""
    pending_tasks: int
    running_tasks: int
    cluster_id: str
    limits: ServerLimits
    registered_tasks: tuple[str, ...]
    raw: cluster_service_pb2.GetClusterResponse = field(repr=False, compare=False, hash=False)
    serving: bool = True
    """The server takes and runs work (store writable, controller answering, an engine ready)."""
    store_writable: bool = True
    cluster_connected: bool = True
    cluster_restarts: int = 0
    """Times the ipyparallel controller was lost and the cluster brought back."""
    problem: str = ""
    """What is wrong, in words, when ``serving`` is false."""
    models: tuple[Model, ...] = ()
    """What ``llm.generate`` can run: the operator's checkpoints, then the demo sizes."""
    model_paths_allowed: bool = False
    """``llm.generate`` accepts a ``model_path`` (inside the directories the operator allowed)."""
    unschedulable_tasks: tuple[str, ...] = ()
    """PENDING tasks whose ``required_tags`` no engine there now carries (attached mode)."""
