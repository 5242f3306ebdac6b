"""The one mapping point from domain errors to gRPC status.

Every refusal leaves the server as a canonical code with a
``google.rpc.ErrorInfo`` (reason, domain ``tether.dev``, metadata) in the rich
status details, plus a ``google.rpc.BadRequest`` when fields are wrong. The
catalog of reasons is in docs/api.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..core import errors as e

log = logging.getLogger(__name__)

DOMAIN = "tether.dev"

MAX_MESSAGE_CHARS = 512
"""Longest status message sent. Messages quote the request (a task name, a label), and
trailers above the client's metadata limit (16 KiB by default in grpcio) turn a clear
INVALID_ARGUMENT into RESOURCE_EXHAUSTED on the client: never echo unbounded input."""
MAX_DETAIL_CHARS = 256
"""Longest ErrorInfo metadata value and BadRequest field or description."""

_CODES: dict[type[e.TetherError], grpc.StatusCode] = {
    e.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    e.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    e.TaskAlreadyTerminal: grpc.StatusCode.FAILED_PRECONDITION,
    e.Unschedulable: grpc.StatusCode.FAILED_PRECONDITION,
    e.CheckpointNotFound: grpc.StatusCode.FAILED_PRECONDITION,
    e.RequestIdReused: grpc.StatusCode.ALREADY_EXISTS,
    e.ResumeTokenExpired: grpc.StatusCode.OUT_OF_RANGE,
    e.SubscriberLagging: grpc.StatusCode.UNAVAILABLE,
    e.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def code_for(err: e.TetherError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(err: e.TetherError) -> grpc.Status:
    """The rich status for a domain error."""
    code = code_for(err)
    details: list[any_pb2.Any] = []
    metadata = {
        clip(key, MAX_DETAIL_CHARS): clip(value, MAX_DETAIL_CHARS)
        for key, value in err.metadata.items()
    }
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=clip(v.field, MAX_DETAIL_CHARS),
                    description=clip(v.description, MAX_DETAIL_CHARS),
                )
                for v in err.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    message = clip(err.message, MAX_MESSAGE_CHARS)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(suffix))] + suffix


def internal_status(exc: BaseException) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=DOMAIN, metadata={"type": type(exc).__name__}
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    status = status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}", details=[packed]
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def unary_errors(fn: F) -> F:
    """Wrap a unary servicer method: domain errors become rich statuses, bugs INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(self, request, context)
        except e.TetherError as err:
            await context.abort_with_status(to_status(err))
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            await context.abort_with_status(internal_status(exc))

    return wrapper  # type: ignore[return-value]


G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])


def stream_errors(fn: G) -> G:
    """Wrap a server-streaming servicer method the same way."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            async for item in fn(self, request, context):
                yield item
        except e.TetherError as err:
            await context.abort_with_status(to_status(err))
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            await context.abort_with_status(internal_status(exc))

    return wrapper  # type: ignore[return-value]
