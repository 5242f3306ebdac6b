"""The browser's door to tether.v1: the Connect protocol over the servicers.

Each RPC's logic exists once, in ``api/``: this module only decodes a request from
protobuf's JSON mapping, calls the *same* servicer method the gRPC server calls, with
a small stand-in for ``grpc.aio.ServicerContext``, and encodes the answer. Errors
leave the servicers as the rich ``grpc.Status`` they always build (``api/errors.py``,
the one mapping point); here they are re-encoded as a Connect error: the same
canonical code, message and details (``google.rpc.ErrorInfo``, ``BadRequest``).

The wire format is the Connect protocol's (https://connectrpc.com/docs/protocol), so
Connect clients (connect-web, ``buf curl --protocol connect``) can call it too:

* unary: ``POST /tether.v1.TaskService/SubmitTask``, ``Content-Type: application/json``,
  the request message as JSON (or ``application/proto``, binary protobuf, which is what
  ``buf curl`` sends); the answer is the response message in the same codec (HTTP 200),
  or an error ``{"code": "failed_precondition", "message": ..., "details": [...]}``
  with the HTTP status Connect assigns to the code;
* server streaming (``StreamTaskStatus``): ``Content-Type: application/connect+json``
  (or ``application/connect+proto``);
  request and responses are *envelopes* (1 flag byte, 4-byte big-endian length, JSON);
  the last envelope (flag 0x02) holds ``{}`` or ``{"error": ...}``.

Why not ``EventSource``: it cannot send an ``Authorization`` header, and a token must
never travel in a URL. ``fetch`` streams the response body and sends the header.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_service_pb2 as spb

from ..api import ClusterService, TaskService
from ..api.errors import DOMAIN

log = logging.getLogger(__name__)

_ = error_details_pb2  # registers ErrorInfo/BadRequest with the pool, for JSON of details

END_STREAM = 0x02
MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""The gRPC server's grpc.max_receive_message_length (app.py): the same limit here."""

# Connect's HTTP status for each code (unary calls; streams always answer 200).
_HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}


class GatewayAbort(grpc.aio.AbortError):
    """Raised by ``GatewayContext.abort_with_status``: the servicer refused the call."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class GatewayContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers use, for an HTTP call.

    The servicers read the caller's ``authorization`` metadata (api/auth.py) and end a
    refused call with ``abort_with_status`` (api/errors.py); nothing else.
    """

    def __init__(self, authorization: str) -> None:
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", authorization),) if authorization else ()
        )

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise GatewayAbort(status)


@dataclass(frozen=True, slots=True)
class Procedure:
    """One tether.v1 RPC as the gateway serves it."""

    path: str
    request_type: type[Message]
    call: Callable[[Any, Any], Any]
    streaming: bool = False


def procedures(tasks: TaskService, cluster: ClusterService) -> list[Procedure]:
    t = "/tether.v1.TaskService/"
    return [
        Procedure(t + "SubmitTask", spb.SubmitTaskRequest, tasks.SubmitTask),
        Procedure(t + "InterruptTask", spb.InterruptTaskRequest, tasks.InterruptTask),
        Procedure(t + "GetTask", spb.GetTaskRequest, tasks.GetTask),
        Procedure(t + "ListTasks", spb.ListTasksRequest, tasks.ListTasks),
        Procedure(
            t + "StreamTaskStatus", spb.StreamTaskStatusRequest, tasks.StreamTaskStatus, True
        ),
        Procedure(
            "/tether.v1.ClusterService/GetCluster", cpb.GetClusterRequest, cluster.GetCluster
        ),
    ]


def to_json(message: Message) -> str:
    """Protobuf's JSON mapping, as grpcurl prints it (camelCase, enum names, no defaults)."""
    return json_format.MessageToJson(message, indent=None)


def connect_error(status: grpc.Status) -> dict[str, Any]:
    """A rich gRPC status as a Connect error object (code, message, details)."""
    code = _code_name(status.code)
    error: dict[str, Any] = {"code": code, "message": status.details or ""}
    rich = None
    for key, value in status.trailing_metadata or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            rich = status_pb2.Status.FromString(value)
    if rich is not None:
        details = []
        for detail in rich.details:
            debug = json_format.MessageToDict(detail)
            debug.pop("@type", None)
            details.append(
                {
                    "type": detail.TypeName(),
                    "value": base64.b64encode(detail.value).decode().rstrip("="),
                    "debug": debug,
                }
            )
        if details:
            error["details"] = details
    return error


def gateway_error(code: str, message: str, reason: str) -> dict[str, Any]:
    """A refusal by the gateway itself (bad JSON, wrong content type), shaped like the rest."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    status = status_pb2.Status(message=message)
    status.details.add().Pack(info)
    return {
        "code": code,
        "message": message,
        "details": [
            {
                "type": info.DESCRIPTOR.full_name,
                "value": base64.b64encode(info.SerializeToString()).decode().rstrip("="),
                "debug": json_format.MessageToDict(info),
            }
        ],
    }


def _code_name(code: grpc.StatusCode) -> str:
    name = code.name.lower()
    return "canceled" if name == "cancelled" else name


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def error_response(error: dict[str, Any], status: int | None = None) -> web.Response:
    """A Connect error answer; its HTTP status follows the code unless ``status`` is given."""
    return web.json_response(error, status=status or _HTTP_STATUS.get(error["code"], 500))


class Codec:
    """Connect's two codecs: JSON (what the dashboard sends) and binary protobuf."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, payload: bytes, message_type: type[Message]) -> Message:
        if self.name == "proto":
            return message_type.FromString(payload)
        return json_format.Parse(payload or b"{}", message_type())

    def encode(self, message: Message) -> bytes:
        if self.name == "proto":
            return message.SerializeToString()
        return to_json(message).encode()


_UNARY_CODECS = {"application/json": Codec("json"), "application/proto": Codec("proto")}
_STREAM_CODECS = {
    "application/connect+json": Codec("json"),
    "application/connect+proto": Codec("proto"),
}


def _unsupported(content_type: str, allowed: dict[str, Codec]) -> dict[str, Any]:
    return gateway_error(
        "unimplemented",
        f"Content-Type {content_type!r} is not served; send one of {', '.join(allowed)}",
        "UNSUPPORTED_CONTENT_TYPE",
    )


def _bad_request(exc: Exception) -> dict[str, Any]:
    return gateway_error("invalid_argument", f"cannot decode the request: {exc}", "INVALID_JSON")


class Gateway:
    """aiohttp handlers for every tether.v1 RPC; ``add_routes`` mounts them."""

    def __init__(self, tasks: TaskService, cluster: ClusterService) -> None:
        self._procedures = {p.path: p for p in procedures(tasks, cluster)}
        self.open_streams = 0

    def serves(self, path: str) -> bool:
        """True when ``path`` is one of the RPCs (its refusals are Connect errors)."""
        return path in self._procedures

    def add_routes(self, app: web.Application) -> None:
        for path, proc in self._procedures.items():
            handler = self._stream if proc.streaming else self._unary
            app.router.add_post(path, _bind(handler, proc))

    async def _unary(self, proc: Procedure, request: web.Request) -> web.StreamResponse:
        codec = _UNARY_CODECS.get(request.content_type)
        if codec is None:
            # Connect answers an unknown codec with 415 Unsupported Media Type.
            return error_response(_unsupported(request.content_type, _UNARY_CODECS), 415)
        try:
            message = codec.decode(await request.read(), proc.request_type)
        except _DECODE_ERRORS as exc:
            return error_response(_bad_request(exc))
        context = GatewayContext(request.headers.get("Authorization", ""))
        try:
            answer = await proc.call(message, context)
        except GatewayAbort as abort:
            return error_response(connect_error(abort.status))
        return web.Response(body=codec.encode(answer), content_type=request.content_type)

    async def _stream(self, proc: Procedure, request: web.Request) -> web.StreamResponse:
        codec = _STREAM_CODECS.get(request.content_type)
        content_type = request.content_type if codec else "application/connect+json"
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        body = await request.read()
        problem = None
        if codec is None:
            problem = _unsupported(request.content_type, _STREAM_CODECS)
        else:
            message, problem = _read_envelope(body, proc.request_type, codec)
        await response.prepare(request)
        if problem is not None or codec is None:
            await _end(response, problem)
            return response
        context = GatewayContext(request.headers.get("Authorization", ""))
        stream: AsyncIterator[Any] = proc.call(message, context)
        self.open_streams += 1
        try:
            async for item in stream:
                if isinstance(item, bytes):  # BASIC events come pre-serialized (shared bytes)
                    if codec.name == "proto":
                        await response.write(envelope(item))
                        continue
                    item = spb.StreamTaskStatusResponse.FromString(item)
                await response.write(envelope(codec.encode(item)))
        except GatewayAbort as abort:
            await _end(response, connect_error(abort.status))
            return response
        except (ConnectionResetError, ConnectionError):
            return response  # the browser went away: the subscription ends below
        finally:
            self.open_streams -= 1
            await stream.aclose()  # type: ignore[attr-defined]
        await _end(response, None)
        return response


_DECODE_ERRORS = (json_format.ParseError, UnicodeDecodeError, DecodeError)


def _read_envelope(
    body: bytes, request_type: type[Message], codec: Codec
) -> tuple[Message, dict[str, Any] | None]:
    empty = request_type()
    if len(body) < 5:
        return empty, gateway_error(
            "invalid_argument", "a streaming call sends one enveloped message", "INVALID_ENVELOPE"
        )
    flags, length = struct.unpack(">BI", body[:5])
    payload = body[5 : 5 + length]
    if flags != 0 or len(payload) != length:
        return empty, gateway_error(
            "invalid_argument",
            "bad envelope (compressed or truncated message)",
            "INVALID_ENVELOPE",
        )
    try:
        return codec.decode(payload, request_type), None
    except _DECODE_ERRORS as exc:
        return empty, _bad_request(exc)


async def _end(response: web.StreamResponse, error: dict[str, Any] | None) -> None:
    end: dict[str, Any] = {} if error is None else {"error": error}
    try:
        await response.write(envelope(json.dumps(end).encode(), END_STREAM))
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass


def _bind(
    handler: Callable[[Procedure, web.Request], Awaitable[web.StreamResponse]], proc: Procedure
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def bound(request: web.Request) -> web.StreamResponse:
        return await handler(proc, request)

    return bound
