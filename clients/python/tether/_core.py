"""The logic ``Client`` and ``AsyncClient`` share, with no I/O of its own.

Everything here is decided without touching a socket: how the client is
configured, how requests are built, when a failed call is retried and after how
long, and which exception a gRPC status becomes. (What a watch does with each
message lives beside it, in ``_watch``.) ``_sync`` and ``_async`` only carry out
what these modules decide, one with blocking calls, the other with ``await``.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tether import _convert
from tether._convert import Seconds
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
    TaskNotFound,
    TaskOutcomeError,
    TetherError,
    Unauthenticated,
    Unavailable,
)
from tether._models import (
    GracePeriods,
    Task,
    TaskFilter,
    TaskRetryPolicy,
    TaskState,
    TaskView,
)
from tether.v1 import task_pb2, task_service_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""Where the clients connect when neither an address nor TETHER_ADDRESS is given."""
ADDRESS_ENV = "TETHER_ADDRESS"
DEFAULT_TIMEOUT = 30.0
"""Deadline in seconds of one unary call, retries included. Streams have none."""
ERROR_DOMAIN = "tether.dev"
"""The ``ErrorInfo.domain`` of the server's errors; reasons of other domains map by code only."""

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Keep idle watch streams alive through NATs and notice a dead server.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # grpc's own reconnect backoff defaults to 1 s growing to 120 s: after a server
    # restart a channel could sit in TRANSIENT_FAILURE long after the server is back.
    # Keep it in step with RetryPolicy's 0.1 s .. 5 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RetryPolicy:
    """How failed calls are retried. Only UNAVAILABLE is ever retried (AIP-194).

    Unary calls make at most ``max_attempts`` attempts within their deadline,
    reusing the same request (and so the same ``request_id``). Watches retry
    without limit; their delay starts at ``initial_backoff``, doubles up to
    ``max_backoff`` and goes back to the start once a message arrives.
    """

    max_attempts: int = 5
    """Attempts of one unary call, the first included."""
    initial_backoff: float = 0.1
    """Delay before the first retry, in seconds."""
    max_backoff: float = 5.0
    """Cap on the delay, in seconds."""
    multiplier: float = 2.0
    """Growth of the delay from one retry to the next."""
    jitter: float = 0.1
    """Random spread of each delay, as a fraction of it (0 for exact delays)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")


class Backoff:
    """Capped exponential delays of a :class:`RetryPolicy`; ``reset`` starts over."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._retries = 0

    def next_delay(self) -> float:
        policy = self._policy
        base = min(policy.initial_backoff * policy.multiplier**self._retries, policy.max_backoff)
        self._retries += 1
        if policy.jitter:
            base *= 1 + random.uniform(-policy.jitter, policy.jitter)
        return max(base, 0.0)

    def reset(self) -> None:
        self._retries = 0


@dataclass(frozen=True)
class ClientConfig:
    """What both clients are configured with; built once by :func:`client_config`."""

    address: str
    timeout: float | None
    retry: RetryPolicy
    metadata: tuple[tuple[str, str], ...]


def client_config(
    address: str | None,
    timeout: Seconds | None,
    retry: RetryPolicy | None,
    token: str | None,
    metadata: Mapping[str, str] | None,
) -> ClientConfig:
    """Resolves the address (argument, then $TETHER_ADDRESS, then 127.0.0.1:50051)."""
    pairs = [(key.lower(), value) for key, value in (metadata or {}).items()]
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    return ClientConfig(
        address=address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        timeout=None if timeout is None else _convert.to_timedelta(timeout).total_seconds(),
        retry=retry or RetryPolicy(),
        metadata=tuple(pairs),
    )


# --------------------------------------------------------------------------- requests


def task_name(name_or_id: str) -> str:
    """``"tasks/abc"`` or ``"abc"`` -> ``"tasks/abc"``."""
    if not name_or_id:
        raise ValueError("a task name or id is required")
    return name_or_id if name_or_id.startswith("tasks/") else f"tasks/{name_or_id}"


def new_request_id() -> str:
    """A fresh idempotency key (UUID4), made once per logical call and kept across retries."""
    return str(uuid.uuid4())


def submit_request(
    task: str,
    *,
    args: Mapping[str, Any] | None,
    labels: Mapping[str, str] | None,
    priority: int,
    timeout: Seconds | None,
    grace: Seconds | GracePeriods | None,
    request_id: str | None,
    resume_from: str | None,
    required_tags: Sequence[str] | None,
    queue_timeout: Seconds | None,
    retry: TaskRetryPolicy | None = None,
    preemptible: bool | None = None,
) -> task_service_pb2.SubmitTaskRequest:
    request = task_service_pb2.SubmitTaskRequest(
        task=task,
        labels=dict(labels or {}),
        priority=priority,
        request_id=request_id or new_request_id(),
        resume_from=task_name(resume_from) if resume_from else "",
        required_tags=list(required_tags or ()),
    )
    if args:
        request.args.CopyFrom(_convert.struct_proto(args))
    if timeout is not None:
        request.timeout.CopyFrom(_convert.duration_proto(timeout))
    if queue_timeout is not None:
        request.queue_timeout.CopyFrom(_convert.duration_proto(queue_timeout))
    if grace is not None:
        request.grace.CopyFrom(_convert.grace_proto(grace))
    if retry is not None:
        request.retry.CopyFrom(_convert.retry_proto(retry))
    if preemptible is not None:
        request.preemptible = preemptible
    return request


def interrupt_request(
    name_or_id: str,
    *,
    reason: str,
    grace: Seconds | GracePeriods | None,
    request_id: str | None,
) -> task_service_pb2.InterruptTaskRequest:
    request = task_service_pb2.InterruptTaskRequest(
        name=task_name(name_or_id), reason=reason, request_id=request_id or new_request_id()
    )
    if grace is not None:
        request.grace.CopyFrom(_convert.grace_proto(grace))
    return request


def get_request(name_or_id: str, view: TaskView | None) -> task_service_pb2.GetTaskRequest:
    return task_service_pb2.GetTaskRequest(
        name=task_name(name_or_id), view=view_proto(view or TaskView.FULL)
    )


def list_request(
    task_filter: TaskFilter | None, page_size: int | None, view: TaskView | None
) -> task_service_pb2.ListTasksRequest:
    request = task_service_pb2.ListTasksRequest(page_size=page_size or 0, view=view_proto(view))
    proto_filter = _convert.filter_proto(task_filter)
    if proto_filter is not None:
        request.filter.CopyFrom(proto_filter)
    return request


def view_proto(view: TaskView | None) -> task_pb2.TaskView.ValueType:
    return task_pb2.TaskView.ValueType((view or TaskView.UNSPECIFIED).value)


def task_result(task: Task) -> Any:
    """The result of a terminal task, or its failure raised as a TaskOutcomeError."""
    if task.state is TaskState.SUCCEEDED:
        return task.result
    raise TaskOutcomeError.from_task(task)


def wait_seconds(timeout: Seconds | None) -> float | None:
    """A ``result(timeout=...)`` in seconds (None: wait as long as it takes)."""
    return None if timeout is None else _convert.to_timedelta(timeout).total_seconds()


def wait_ran_out() -> DeadlineExceeded:
    """What ``result`` raises when its timeout passes first."""
    return DeadlineExceeded(
        "the task did not reach a terminal state within the timeout",
        code=grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def outcome(task: Task, *, return_exceptions: bool) -> Any:
    """One ``map`` item: the result, or the failure raised (or returned, when asked)."""
    if task.state is TaskState.SUCCEEDED:
        return task.result
    error = TaskOutcomeError.from_task(task)
    if return_exceptions:
        return error
    raise error


# --------------------------------------------------------------------------- errors

_ERROR_BY_REASON: dict[str, type[TetherError]] = {
    "TASK_NOT_FOUND": TaskNotFound,
    "TASK_ALREADY_TERMINAL": TaskAlreadyTerminal,
    "CHECKPOINT_NOT_FOUND": CheckpointNotFound,
    "REQUEST_ID_REUSED": RequestIdReused,
    "RESUME_TOKEN_EXPIRED": ResumeTokenExpired,
    "SUBSCRIBER_LAGGING": SubscriberLagging,
    "SHUTTING_DOWN": ShuttingDown,
}

_ERROR_BY_CODE: dict[grpc.StatusCode, type[TetherError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_from_status(
    code: grpc.StatusCode, details: str | None, status: status_pb2.Status | None
) -> TetherError:
    """The one place a failed call becomes an exception (see ``_exceptions`` for the tree).

    ``status`` is the rich ``google.rpc.Status`` from the trailers, when the server
    sent one; its ``ErrorInfo`` picks the class by reason, its ``BadRequest``
    fills ``InvalidArgument.violations``.
    """
    message = details or code.name
    reason, domain, metadata = "", "", {}
    violations: list[FieldViolation] = []
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and not reason:
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(item.field, item.description)
                    for item in bad_request.field_violations
                )
    by_reason = _ERROR_BY_REASON.get(reason) if domain == ERROR_DOMAIN else None
    error_type = by_reason or _ERROR_BY_CODE.get(code, TetherError)
    if issubclass(error_type, InvalidArgument) or code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(
            message, code=code, reason=reason, metadata=metadata, violations=violations
        )
    return error_type(message, code=code, reason=reason, metadata=metadata)


def error_from_rpc(exc: grpc.RpcError) -> TetherError:
    """The typed exception for a failed blocking call (:func:`error_from_status` decides which)."""
    if not isinstance(exc, grpc.Call):
        return TetherError(str(exc) or "the call failed", code=grpc.StatusCode.UNKNOWN)
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # the rich status contradicts the call's code or message
        status = None
    return error_from_status(exc.code(), exc.details(), status)


class UnaryAttempts:
    """The retry loop of one unary call: its deadline and when (if ever) to try again."""

    def __init__(self, config: ClientConfig) -> None:
        self._policy = config.retry
        self._backoff = Backoff(config.retry)
        self._deadline = None if config.timeout is None else time.monotonic() + config.timeout
        self._attempts = 0

    def timeout(self) -> float | None:
        """Seconds left for the next attempt (None: no deadline)."""
        self._attempts += 1
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.001)

    def retry_delay(self, error: TetherError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up and raise ``error``."""
        if not isinstance(error, Unavailable) or self._attempts >= self._policy.max_attempts:
            return None
        delay = self._backoff.next_delay()
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        return delay
