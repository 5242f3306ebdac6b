"""tether: the typed Python client of the tether control plane.

Submit registered tasks to an ipyparallel cluster behind a tether server, watch
them change live, and stop them while they run::

    import tether

    with tether.Client("127.0.0.1:50051") as client:
        handle = client.submit("demo.sleep", args={"seconds": 60})
        handle.interrupt(reason="changed my mind")
        try:
            handle.result()
        except tether.TaskInterrupted as exc:
            print(exc.task.interrupt)

Many tasks at once: ``client.map("demo.echo", ({"value": n} for n in range(1000)))``
yields results in order with at most 64 in flight; every ``result()`` and ``map`` of
a client waits over one shared stream (``tether._outcomes``).

``AsyncClient`` offers the same methods for asyncio. Users see the dataclasses
and enums exported here (``Task``, ``TaskEvent``, ``TaskState``...) and the
exceptions of ``tether._exceptions``; the generated protobuf code lives in
``tether.v1`` and is reachable through each object's ``raw`` attribute.
The ``tether`` command line (``tether.cli``) is built on ``Client``.
"""

from tether._async import AsyncClient, AsyncTaskHandle, AsyncTaskWatch
from tether._core import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, RetryPolicy
from tether._exceptions import (
    AlreadyExists,
    CheckpointNotFound,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RequestIdReused,
    ResourceExhausted,
    ResumeTokenExpired,
    ShuttingDown,
    SubscriberLagging,
    TaskAlreadyTerminal,
    TaskCancelled,
    TaskFailed,
    TaskInterrupted,
    TaskNotFound,
    TaskOutcomeError,
    TaskTimedOut,
    TetherError,
    Unauthenticated,
    Unavailable,
)
from tether._models import (
    AttemptEnding,
    Checkpoint,
    Cluster,
    ClusterMode,
    Engine,
    EngineState,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    InterruptRecord,
    Model,
    Progress,
    ResourceReport,
    ServerLimits,
    Task,
    TaskAttempt,
    TaskError,
    TaskEvent,
    TaskEventType,
    TaskFilter,
    TaskRetryPolicy,
    TaskState,
    TaskView,
)
from tether._sync import Client, TaskHandle, TaskWatch

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "AlreadyExists",
    "AsyncClient",
    "AsyncTaskHandle",
    "AsyncTaskWatch",
    "AttemptEnding",
    "Checkpoint",
    "CheckpointNotFound",
    "Client",
    "Cluster",
    "ClusterMode",
    "DeadlineExceeded",
    "Engine",
    "EngineState",
    "EscalationStage",
    "FailedPrecondition",
    "FieldViolation",
    "GracePeriods",
    "InterruptCause",
    "InterruptRecord",
    "InvalidArgument",
    "Model",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "Progress",
    "RequestIdReused",
    "ResourceExhausted",
    "ResourceReport",
    "ResumeTokenExpired",
    "RetryPolicy",
    "ServerLimits",
    "ShuttingDown",
    "SubscriberLagging",
    "Task",
    "TaskAlreadyTerminal",
    "TaskAttempt",
    "TaskCancelled",
    "TaskError",
    "TaskEvent",
    "TaskEventType",
    "TaskFailed",
    "TaskFilter",
    "TaskHandle",
    "TaskInterrupted",
    "TaskNotFound",
    "TaskOutcomeError",
    "TaskRetryPolicy",
    "TaskState",
    "TaskTimedOut",
    "TaskView",
    "TaskWatch",
    "TetherError",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

# Present the public names as tether.X, not tether._module.X (reprs, docs, pickling).
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith("tether._"):
        _value.__module__ = "tether"
del _name, _value
