"""Every exception the client raises. The whole tree::

    TetherError                      base: .code, .reason, .metadata, .message
    ├── InvalidArgument              INVALID_ARGUMENT, any reason; .violations
    ├── NotFound                     NOT_FOUND
    │   └── TaskNotFound             reason TASK_NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    │   └── RequestIdReused          reason REQUEST_ID_REUSED (same request_id, other payload)
    ├── FailedPrecondition           FAILED_PRECONDITION
    │   ├── TaskAlreadyTerminal      reason TASK_ALREADY_TERMINAL
    │   └── CheckpointNotFound       reason CHECKPOINT_NOT_FOUND
    ├── OutOfRange                   OUT_OF_RANGE
    │   └── ResumeTokenExpired       reason RESUME_TOKEN_EXPIRED
    ├── Unavailable                  UNAVAILABLE (server down, restarting, unreachable)
    │   ├── SubscriberLagging        reason SUBSCRIBER_LAGGING
    │   └── ShuttingDown             reason SHUTTING_DOWN
    ├── Unauthenticated              UNAUTHENTICATED
    ├── PermissionDenied             PERMISSION_DENIED
    ├── ResourceExhausted            RESOURCE_EXHAUSTED
    ├── DeadlineExceeded             DEADLINE_EXCEEDED, or a client-side wait ran out
    │                                (also a builtin TimeoutError)
    └── TaskOutcomeError             the task ended without succeeding; .task
        ├── TaskFailed               FAILED (raised, engine lost, controller restarted...)
        ├── TaskInterrupted          INTERRUPTED
        ├── TaskTimedOut             TIMED_OUT
        └── TaskCancelled            CANCELLED (interrupted before it started)

A failed call maps to the most specific class: first by the ``google.rpc.ErrorInfo``
reason the server put in the rich status (domain ``tether.dev``), then by the
gRPC status code. Codes without a class here (INTERNAL, UNKNOWN, UNIMPLEMENTED,
ABORTED, CANCELLED, DATA_LOSS) raise a plain :class:`TetherError`; its ``code``
says which. ``reason`` is ``""`` when the server sent no ErrorInfo (e.g. the
transport failed before reaching the server).

The task-outcome exceptions have no gRPC code (``code is None``): the calls all
succeeded, the task did not. Their ``reason`` is the task's ``error.reason``
(TASK_RAISED, INTERRUPTED, ENGINE_LOST, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tether._models import Task, TaskState

__all__ = [
    "AlreadyExists",
    "CheckpointNotFound",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RequestIdReused",
    "ResourceExhausted",
    "ResumeTokenExpired",
    "ShuttingDown",
    "SubscriberLagging",
    "TaskAlreadyTerminal",
    "TaskCancelled",
    "TaskFailed",
    "TaskInterrupted",
    "TaskNotFound",
    "TaskOutcomeError",
    "TaskTimedOut",
    "TetherError",
    "Unauthenticated",
    "Unavailable",
]


@dataclass(frozen=True)
class FieldViolation:
    """One wrong field of a request (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    """Path of the field, e.g. ``"args"`` or ``"grace.sigint"``."""
    description: str
    """What is wrong with it."""


class TetherError(Exception):
    """Base of every exception raised by the tether client.

    Attributes:
        code: The gRPC status code of the failed call; None for task outcomes.
        reason: ``ErrorInfo.reason`` (UPPER_SNAKE_CASE), ``""`` when the server sent none.
        metadata: ``ErrorInfo.metadata``: every dynamic value of the message.
        message: The server's (or the client's) developer-facing message.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        label = self.reason or (self.code.name if self.code is not None else "")
        return f"{label}: {self.message}" if label else self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args) by default, which would lose code, reason and
        # the rest (and cannot rebuild a TaskOutcomeError): rebuild from the attributes.
        return (_restore, (type(self), self.args, self.__dict__))


class InvalidArgument(TetherError):
    """The request was refused as malformed (INVALID_ARGUMENT, any reason).

    ``violations`` lists the wrong fields from ``google.rpc.BadRequest``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = grpc.StatusCode.INVALID_ARGUMENT,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
    ) -> None:
        super().__init__(message, code=code, reason=reason, metadata=metadata)
        self.violations: list[FieldViolation] = list(violations)


class NotFound(TetherError):
    """A named resource does not exist (NOT_FOUND)."""


class TaskNotFound(NotFound):
    """No task has this name (TASK_NOT_FOUND)."""


class AlreadyExists(TetherError):
    """The resource or request already exists (ALREADY_EXISTS)."""


class RequestIdReused(AlreadyExists):
    """The request_id was used before with a different payload (REQUEST_ID_REUSED)."""


class FailedPrecondition(TetherError):
    """The system is not in a state that allows the call (FAILED_PRECONDITION)."""


class TaskAlreadyTerminal(FailedPrecondition):
    """The task already SUCCEEDED, FAILED or TIMED_OUT; it cannot be interrupted."""


class CheckpointNotFound(FailedPrecondition):
    """``resume_from`` names a task that holds no checkpoint."""


class OutOfRange(TetherError):
    """A position lies outside what the server retains (OUT_OF_RANGE)."""


class ResumeTokenExpired(OutOfRange):
    """The resume token is older than the retained event log, or from another controller.

    ``Client.watch`` handles this itself by re-listing; callers of the raw stream see it.
    """


class Unavailable(TetherError):
    """The server cannot be reached or asked the client to come back later (UNAVAILABLE).

    Unary calls are retried a few times before this is raised; watches never raise it.
    """


class SubscriberLagging(Unavailable):
    """A watch fell behind its bounded server-side queue and was ended; resume from its token."""


class ShuttingDown(Unavailable):
    """The server is shutting down."""


class Unauthenticated(TetherError):
    """No valid credentials were presented (UNAUTHENTICATED)."""


class PermissionDenied(TetherError):
    """The caller may not do this, e.g. interrupt another owner's task (PERMISSION_DENIED)."""


class ResourceExhausted(TetherError):
    """A server limit was hit: too many subscribers, a full queue (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(TetherError, TimeoutError):
    """A call's deadline, or a client-side wait such as ``TaskHandle.result(timeout=...)``, ran out."""


class TaskOutcomeError(TetherError):
    """The task ended in a state other than SUCCEEDED; ``task`` is the final task (FULL view)."""

    def __init__(self, task: Task) -> None:
        error = task.error
        detail = error.message if error is not None and error.message else ""
        message = f"task {task.name} ended {task.state.name}"
        if error is not None and error.type:
            detail = f"{error.type}: {detail}" if detail else error.type
        if detail:
            message = f"{message}: {detail}"
        super().__init__(
            message,
            reason=error.reason if error is not None and error.reason else task.state.name,
            metadata={"task": task.name, "state": task.state.name},
        )
        self.task = task

    @staticmethod
    def from_task(task: Task) -> TaskOutcomeError:
        """The exception matching a terminal, unsuccessful task."""
        return _OUTCOME_BY_STATE.get(task.state, TaskFailed)(task)


class TaskFailed(TaskOutcomeError):
    """The task raised, its engine was lost, or the controller restarted under it."""


class TaskInterrupted(TaskOutcomeError):
    """The task was stopped by an interrupt while it ran; ``task.interrupt`` says how."""


class TaskTimedOut(TaskOutcomeError):
    """The task ran past its timeout and was stopped."""


class TaskCancelled(TaskOutcomeError):
    """The task was interrupted before it started; it never ran."""


def _restore(
    error_type: type[TetherError], args: tuple[Any, ...], state: dict[str, Any]
) -> TetherError:
    error = error_type.__new__(error_type)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


_OUTCOME_BY_STATE: dict[TaskState, type[TaskOutcomeError]] = {
    TaskState.FAILED: TaskFailed,
    TaskState.INTERRUPTED: TaskInterrupted,
    TaskState.TIMED_OUT: TaskTimedOut,
    TaskState.CANCELLED: TaskCancelled,
}
