"""Domain errors. Each has a stable ``reason`` (google.rpc.ErrorInfo.reason) and
metadata; ``tether_server.api.errors`` is the one place that maps them to gRPC
status codes. Nothing here knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One wrong field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class TetherError(Exception):
    """Base of every domain error.

    ``reason`` is UPPER_SNAKE_CASE and stable; ``metadata`` holds every dynamic
    value of the message (AIP-193).
    """

    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[FieldViolation] = list(violations or [])


class InvalidRequest(TetherError):
    """A request field is missing or wrong (INVALID_ARGUMENT with BadRequest)."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        violations: list[FieldViolation],
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata, violations=violations)
        self.reason = reason


class TaskNotFound(TetherError):
    reason = "TASK_NOT_FOUND"


class TaskAlreadyTerminal(TetherError):
    reason = "TASK_ALREADY_TERMINAL"


class RequestIdReused(TetherError):
    """The same request_id came with a different payload (ALREADY_EXISTS)."""

    reason = "REQUEST_ID_REUSED"


class ResumeTokenExpired(TetherError):
    """The token is older than the retained log, or from another controller (OUT_OF_RANGE)."""

    reason = "RESUME_TOKEN_EXPIRED"


class SubscriberLagging(TetherError):
    """A subscriber fell behind its bounded queue (UNAVAILABLE)."""

    reason = "SUBSCRIBER_LAGGING"


class ShuttingDown(TetherError):
    """The server is shutting down (UNAVAILABLE)."""

    reason = "SHUTTING_DOWN"


class CheckpointNotFound(TetherError):
    """resume_from names a task without a checkpoint (FAILED_PRECONDITION)."""

    reason = "CHECKPOINT_NOT_FOUND"


class PermissionDenied(TetherError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(TetherError):
    reason = "UNAUTHENTICATED"


class ResourceExhausted(TetherError):
    """A server-side limit was hit (too many subscribers, queue full)."""

    reason = "RESOURCE_EXHAUSTED"


class StoreUnavailable(TetherError):
    """The store cannot write now (disk full, I/O error, the file locked by another
    process). Nothing of the request was recorded and nothing of it runs: retrying
    later with the same ``request_id`` is safe."""

    reason = "STORE_UNAVAILABLE"


class Unschedulable(TetherError):
    """No engine carries the task's ``required_tags`` and none that the server can start
    would (embedded mode); the task is not stored."""

    reason = "UNSCHEDULABLE"
