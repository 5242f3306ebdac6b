"""tether.v1.TaskService: validate, call the controller, convert. Nothing else."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from ..controller import Controller, SubmitSpec
from ..core.eventlog import decode_page_token, encode_page_token, encode_token
from ..core.filters import TaskFilter
from ..subscriptions import Subscription
from . import convert
from .auth import Authenticator
from .errors import stream_errors, unary_errors
from .validation import (
    Violations,
    check_duration,
    check_filter,
    check_labels,
    check_request_id,
    grace_from_pb,
    parse_task_name,
    retry_from_pb,
)


def fingerprint(request: Message) -> str:
    """A stable digest of a request without its request_id (idempotency payload check);
    "" for a request without one (nothing will be compared with it)."""
    if not getattr(request, "request_id", ""):
        return ""
    clone = type(request)()
    clone.CopyFrom(request)
    clone.ClearField("request_id")
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


class TaskService:
    """Servicer of tether.v1.TaskService (registered by app.py)."""

    def __init__(self, controller: Controller, auth: Authenticator | None = None) -> None:
        self.controller = controller
        self.limits = controller.config.limits
        self.auth = auth or Authenticator()

    @unary_errors
    async def SubmitTask(
        self, request: spb.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.SubmitTaskResponse:
        principal = self.auth.authenticate(context)
        v = Violations()
        limits = self.limits
        if not request.task:
            v.add("MISSING_FIELD", "task", "required: the registered task to run, e.g. demo.sleep")
        size = request.args.ByteSize()
        if size > limits.max_args_bytes:
            v.add(
                "ARGS_TOO_LARGE",
                "args",
                f"arguments are {size} bytes, the limit is {limits.max_args_bytes}",
            )
        check_labels(v, request.labels, limits)
        check_request_id(v, request.request_id, limits)
        timeout = None
        if request.HasField("timeout"):
            timeout = check_duration(
                v, request.timeout, "timeout", "INVALID_TIMEOUT", limits.max_timeout_seconds
            )
        queue_timeout = None
        if request.HasField("queue_timeout"):
            queue_timeout = check_duration(
                v,
                request.queue_timeout,
                "queue_timeout",
                "INVALID_TIMEOUT",
                limits.max_timeout_seconds,
            )
        grace = None
        if request.HasField("grace"):
            grace = grace_from_pb(v, request.grace, self.controller.config.grace, limits, "grace")
        if request.resume_from:
            try:
                parse_task_name(request.resume_from, "resume_from")
            except Exception:
                v.add("INVALID_NAME", "resume_from", "must be a task name like tasks/{id}")
        for i, tag in enumerate(request.required_tags):
            if not tag or len(tag) > 63:
                v.add("INVALID_TAGS", f"required_tags[{i}]", "tags are 1-63 characters")
        retry = None
        if request.HasField("retry"):
            default = self.controller.config.retry
            retry = retry_from_pb(v, request.retry, default, limits, "retry")
        v.raise_if_any()
        spec = SubmitSpec(
            task=request.task,
            args=convert.struct_to_dict(request.args),
            labels=dict(request.labels),
            priority=request.priority,
            timeout=timeout,
            queue_timeout=queue_timeout,
            grace=grace,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            resume_from=request.resume_from,
            required_tags=tuple(request.required_tags),
            owner=principal.name,
            retry=retry,
            preemptible=request.preemptible if request.HasField("preemptible") else None,
        )
        task, dedup = await self.controller.submit(spec)
        return spb.SubmitTaskResponse(
            task=convert.task_to_pb(task, convert.BASIC), deduplicated=dedup
        )

    @unary_errors
    async def InterruptTask(
        self, request: spb.InterruptTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.InterruptTaskResponse:
        principal = self.auth.authenticate(context)
        task_id = parse_task_name(request.name)
        v = Violations()
        check_request_id(v, request.request_id, self.limits)
        if len(request.reason) > self.limits.max_reason_chars:
            v.add("INVALID_REASON", "reason", f"at most {self.limits.max_reason_chars} chars")
        grace = None
        if request.HasField("grace"):
            base = (await self.controller.get(task_id)).grace
            grace = grace_from_pb(v, request.grace, base, self.limits, "grace")
        v.raise_if_any()
        task, dedup = await self.controller.interrupt(
            task_id,
            reason=request.reason,
            grace=grace,
            request_id=request.request_id,
            fingerprint=fingerprint(request),
            principal=principal.name,
            admin=principal.admin,
        )
        return spb.InterruptTaskResponse(
            task=convert.task_to_pb(task, convert.BASIC), deduplicated=dedup
        )

    @unary_errors
    async def GetTask(
        self, request: spb.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.GetTaskResponse:
        self.auth.authenticate(context)
        task_id = parse_task_name(request.name)
        view = request.view or tpb.TASK_VIEW_FULL
        return spb.GetTaskResponse(
            task=convert.task_to_pb(await self.controller.get(task_id), view)
        )

    @unary_errors
    async def ListTasks(
        self, request: spb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.ListTasksResponse:
        self.auth.authenticate(context)
        v = Violations()
        if request.page_size < 0:
            v.add(
                "INVALID_PAGE_SIZE", "page_size", f"must not be negative, got {request.page_size}"
            )
        check_filter(v, request.filter)
        v.raise_if_any()
        size = min(request.page_size or self.limits.default_page_size, self.limits.max_page_size)
        flt = convert.filter_from_pb(request.filter)
        fp = flt.fingerprint()
        after = decode_page_token(request.page_token, fp) if request.page_token else 0
        # The token is taken before the listing: watching from it cannot miss a change.
        resume_token = encode_token(self.controller.epoch, self.controller.latest_revision)
        tasks, last = await self.controller.list_tasks(flt, after, size)
        view = request.view or tpb.TASK_VIEW_BASIC
        return spb.ListTasksResponse(
            tasks=[convert.task_to_pb(t, view) for t in tasks],
            next_page_token=encode_page_token(last, fp) if last is not None else "",
            resume_token=resume_token,
        )

    @stream_errors
    async def StreamTaskStatus(
        self, request: spb.StreamTaskStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        principal = self.auth.authenticate(context)
        v = Violations()
        task_id: str | None = None
        if request.name:
            task_id = parse_task_name(request.name)
            if request.HasField("filter"):
                v.add("INVALID_FILTER", "filter", "give either name or filter, not both")
        check_filter(v, request.filter)
        interval = self.controller.config.checkpoint_interval_seconds
        if request.HasField("checkpoint_interval"):
            interval = check_duration(
                v,
                request.checkpoint_interval,
                "checkpoint_interval",
                "INVALID_CHECKPOINT_INTERVAL",
                3600,
            )
            interval = max(interval, 0.05)
        v.raise_if_any()
        full = request.view == tpb.TASK_VIEW_FULL
        flt = convert.filter_from_pb(request.filter) if task_id is None else TaskFilter()
        ctl = self.controller
        sub = await ctl.subscribe(
            task_id=task_id,
            flt=flt,
            resume_token=request.resume_token,
            send_initial_state=request.send_initial_state,
            exclude_progress=request.exclude_progress,
            full_view=full,
            principal=principal.name,
        )
        epoch = ctl.epoch
        view = tpb.TASK_VIEW_FULL if full else tpb.TASK_VIEW_BASIC
        try:
            async for item in _initial_items(sub):
                if isinstance(item, tuple):
                    kind, task, rev = item
                    if kind == "snapshot":
                        yield convert.snapshot_response(epoch, rev, task, view)
                        if task_id is not None and task.state.terminal:
                            return
                    else:
                        yield convert.checkpoint_response(epoch, rev, time.time(), initial=True)
                    continue
                yield self._payload(item, full)
                if task_id is not None and item.task.state.terminal and item.kind.value == 2:
                    return
            while True:
                entry = await sub.get(interval)
                if entry is None:
                    yield convert.checkpoint_response(epoch, ctl.latest_revision, time.time())
                    continue
                yield self._payload(entry, full)
                if task_id is not None and entry.task.state.terminal and entry.kind.value == 2:
                    return
        finally:
            ctl.unsubscribe(sub)

    def _payload(self, entry: Any, full: bool) -> bytes:
        """The serialized message of a log entry; BASIC is serialized once for all subscribers."""
        if full:
            return convert.event_response(
                self.controller.epoch,
                entry.revision,
                entry.kind,
                entry.task,
                entry.time,
                entry.chunk,
                tpb.TASK_VIEW_FULL,
            ).SerializeToString()
        cell = entry.payload
        if cell[0] is None:
            cell[0] = convert.event_response(
                self.controller.epoch,
                entry.revision,
                entry.kind,
                entry.task,
                entry.time,
                entry.chunk,
            ).SerializeToString()
        return bytes(cell[0])


async def _initial_items(sub: Subscription) -> AsyncIterator[Any]:
    """What a stream sends before going live: the store's part first, then memory's."""
    if sub.prefix is not None:
        async for item in sub.prefix:
            yield item
    for item in sub.initial:
        yield item
