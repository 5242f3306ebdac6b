"""Conversion between ``tether.v1`` protobufs and the client's dataclasses.

The only module (with ``_core``) that reads or builds protobuf messages field by
field. JSON numbers arrive as doubles (``google.protobuf.Value`` has no integer
type); integral ones within 2**53 come back as ``int`` so that ``{"n": 20}``
round-trips as ``20``, not ``20.0``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

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
)
from tether.v1 import cluster_service_pb2, task_pb2, task_service_pb2

Seconds = float | timedelta
"""A duration given by a caller: seconds as a number, or a timedelta."""

_E = TypeVar("_E", bound=enum.Enum)
_MAX_SAFE_INTEGER = 2**53


def enum_from_proto(enum_type: type[_E], value: int) -> _E:
    """The member with this proto number; UNSPECIFIED for numbers newer than this client."""
    try:
        return enum_type(value)
    except ValueError:
        return enum_type(0)


def timestamp(message: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    """An aware UTC datetime, or None for an unset field."""
    if not present:
        return None
    return message.ToDatetime(tzinfo=UTC)


def duration(message: duration_pb2.Duration, present: bool) -> timedelta | None:
    """A timedelta, or None for an unset field."""
    return message.ToTimedelta() if present else None


def to_timedelta(value: Seconds) -> timedelta:
    """Seconds (a number) or a timedelta, as a timedelta; negatives are refused."""
    result = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if result < timedelta(0):
        raise ValueError(f"durations must not be negative, got {value!r}")
    return result


def duration_proto(value: Seconds) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(to_timedelta(value))
    return message


def python_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as plain Python (see the module docstring for numbers)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_SAFE_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return python_struct(value.struct_value)
    if kind == "list_value":
        return [python_value(item) for item in value.list_value.values]
    return None


def python_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: python_value(item) for key, item in struct.fields.items()}


def struct_proto(args: Mapping[str, Any]) -> struct_pb2.Struct:
    """JSON-shaped keyword arguments as a Struct; raises TypeError for non-JSON values."""
    struct = struct_pb2.Struct()
    try:
        struct.update(dict(args))
    except (ValueError, TypeError, AttributeError) as exc:
        raise TypeError(f"task arguments must be JSON-shaped: {exc}") from None
    return struct


def grace_from_proto(message: task_pb2.GracePeriods) -> GracePeriods:
    return GracePeriods(
        sigint=duration(message.sigint, message.HasField("sigint")),
        sigterm=duration(message.sigterm, message.HasField("sigterm")),
        sigkill=duration(message.sigkill, message.HasField("sigkill")),
    )


def grace_proto(grace: Seconds | GracePeriods) -> task_pb2.GracePeriods:
    """A single duration sets the SIGINT stage (the usual meaning of "grace")."""
    periods = grace if isinstance(grace, GracePeriods) else GracePeriods(sigint=to_timedelta(grace))
    message = task_pb2.GracePeriods()
    if periods.sigint is not None:
        message.sigint.CopyFrom(duration_proto(periods.sigint))
    if periods.sigterm is not None:
        message.sigterm.CopyFrom(duration_proto(periods.sigterm))
    if periods.sigkill is not None:
        message.sigkill.CopyFrom(duration_proto(periods.sigkill))
    return message


def filter_proto(task_filter: TaskFilter | None) -> task_service_pb2.TaskFilter | None:
    if task_filter is None:
        return None
    return task_service_pb2.TaskFilter(
        states=[task_pb2.TaskState.ValueType(state.value) for state in task_filter.states],
        tasks=list(task_filter.tasks),
        labels=dict(task_filter.labels),
        names=list(task_filter.names),
    )


def task_from_proto(message: task_pb2.Task) -> Task:
    error = message.error if message.HasField("error") else None
    return Task(
        name=message.name,
        task=message.task,
        args=python_struct(message.args),
        state=enum_from_proto(TaskState, message.state),
        labels=dict(message.labels),
        priority=message.priority,
        engine_id=message.engine_id if message.HasField("engine_id") else None,
        attempt=message.attempt,
        create_time=timestamp(message.create_time, message.HasField("create_time")),
        start_time=timestamp(message.start_time, message.HasField("start_time")),
        end_time=timestamp(message.end_time, message.HasField("end_time")),
        update_time=timestamp(message.update_time, message.HasField("update_time")),
        timeout=duration(message.timeout, message.HasField("timeout")),
        queue_timeout=duration(message.queue_timeout, message.HasField("queue_timeout")),
        grace=grace_from_proto(message.grace),
        progress=(
            Progress(message.progress.fraction, message.progress.message)
            if message.HasField("progress")
            else None
        ),
        output=message.output,
        output_truncated=message.output_truncated,
        interrupt=_interrupt_from_proto(message),
        result=python_value(message.result) if message.HasField("result") else None,
        error=(
            TaskError(error.reason, error.type, error.message, error.traceback)
            if error is not None
            else None
        ),
        revision=message.revision,
        owner=message.owner,
        resume_from=message.resume_from,
        has_checkpoint=message.has_checkpoint,
        resources=_resources_from_proto(message),
        required_tags=tuple(message.required_tags),
        retry=_retry_from_proto(message),
        preemptible=message.preemptible,
        attempts=tuple(_attempt_from_proto(a) for a in message.attempts),
        raw=message,
    )


def _retry_from_proto(task: task_pb2.Task) -> TaskRetryPolicy | None:
    if not task.HasField("retry"):
        return None
    r = task.retry
    return TaskRetryPolicy(
        max_attempts=r.max_attempts,
        retry_on=tuple(r.retry_on),
        initial_backoff=duration(r.initial_backoff, r.HasField("initial_backoff")),
        max_backoff=duration(r.max_backoff, r.HasField("max_backoff")),
        backoff_multiplier=r.backoff_multiplier,
        jitter=r.jitter,
    )


def retry_proto(policy: TaskRetryPolicy) -> task_pb2.RetryPolicy:
    message = task_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        retry_on=list(policy.retry_on),
        backoff_multiplier=policy.backoff_multiplier,
        jitter=policy.jitter,
    )
    if policy.initial_backoff is not None:
        message.initial_backoff.CopyFrom(duration_proto(policy.initial_backoff))
    if policy.max_backoff is not None:
        message.max_backoff.CopyFrom(duration_proto(policy.max_backoff))
    return message


def _attempt_from_proto(a: task_pb2.TaskAttempt) -> TaskAttempt:
    return TaskAttempt(
        attempt=a.attempt,
        engine_id=a.engine_id if a.HasField("engine_id") else None,
        start_time=timestamp(a.start_time, a.HasField("start_time")),
        end_time=timestamp(a.end_time, a.HasField("end_time")),
        ending=enum_from_proto(AttemptEnding, a.ending),
        reason=a.reason,
        message=a.message,
        ended_by=a.ended_by,
    )


def _interrupt_from_proto(task: task_pb2.Task) -> InterruptRecord | None:
    if not task.HasField("interrupt"):
        return None
    record = task.interrupt
    return InterruptRecord(
        requested_by=record.requested_by,
        reason=record.reason,
        request_time=timestamp(record.request_time, record.HasField("request_time")),
        cause=enum_from_proto(InterruptCause, record.cause),
        stage=enum_from_proto(EscalationStage, record.stage),
        final_stage=enum_from_proto(EscalationStage, record.final_stage),
        grace=grace_from_proto(record.grace),
    )


def _resources_from_proto(task: task_pb2.Task) -> ResourceReport | None:
    if not task.HasField("resources"):
        return None
    report = task.resources
    return ResourceReport(
        rss_before_bytes=report.rss_before_bytes,
        rss_after_bytes=report.rss_after_bytes,
        gpu_allocated_before_bytes=report.gpu_allocated_before_bytes,
        gpu_allocated_after_bytes=report.gpu_allocated_after_bytes,
        gpu_reserved_after_bytes=report.gpu_reserved_after_bytes,
        leftover_children=report.leftover_children,
        reclaimed=report.reclaimed,
        engine_recycled=report.engine_recycled,
        summary=report.summary,
    )


def event_from_proto(message: task_service_pb2.TaskEvent, resume_token: str) -> TaskEvent:
    return TaskEvent(
        type=enum_from_proto(TaskEventType, message.type),
        task=task_from_proto(message.task),
        event_time=timestamp(message.event_time, message.HasField("event_time")),
        output_chunk=message.output_chunk,
        revision=message.revision,
        resume_token=resume_token,
        raw=message,
    )


def snapshot_event(task: Task, resume_token: str) -> TaskEvent:
    """A SNAPSHOT event the client makes from a listed task (see ``Client.watch``)."""
    return TaskEvent(
        type=TaskEventType.SNAPSHOT,
        task=task,
        event_time=task.update_time,
        output_chunk="",
        revision=task.revision,
        resume_token=resume_token,
        raw=None,
    )


def checkpoint_from_proto(
    message: task_service_pb2.StreamCheckpoint, resume_token: str
) -> Checkpoint:
    return Checkpoint(
        revision=message.revision,
        initial_state_complete=message.initial_state_complete,
        time=timestamp(message.time, message.HasField("time")),
        resume_token=resume_token,
    )


def cluster_from_proto(message: cluster_service_pb2.GetClusterResponse) -> Cluster:
    limits = message.limits
    return Cluster(
        engines=tuple(_engine_from_proto(engine) for engine in message.engines),
        mode=enum_from_proto(ClusterMode, message.mode),
        target_size=message.target_size,
        degraded=message.degraded,
        pending_tasks=message.pending_tasks,
        running_tasks=message.running_tasks,
        cluster_id=message.cluster_id,
        limits=ServerLimits(
            max_args_bytes=limits.max_args_bytes,
            max_grace=duration(limits.max_grace, limits.HasField("max_grace")),
            max_timeout=duration(limits.max_timeout, limits.HasField("max_timeout")),
            max_output_bytes=limits.max_output_bytes,
            max_page_size=limits.max_page_size,
            max_labels=limits.max_labels,
        ),
        registered_tasks=tuple(message.registered_tasks),
        raw=message,
        serving=message.serving,
        store_writable=message.store_writable,
        cluster_connected=message.cluster_connected,
        cluster_restarts=message.cluster_restarts,
        problem=message.problem,
        models=tuple(
            Model(name=m.name, kind=m.kind, context_length=m.context_length, chat=m.chat)
            for m in message.models
        ),
        model_paths_allowed=message.model_paths_allowed,
        unschedulable_tasks=tuple(message.unschedulable_tasks),
    )


def _engine_from_proto(message: cluster_service_pb2.Engine) -> Engine:
    return Engine(
        id=message.id,
        host=message.host,
        pid=message.pid,
        state=enum_from_proto(EngineState, message.state),
        current_task=message.current_task,
        tasks_done=message.tasks_done,
        last_seen=timestamp(message.last_seen, message.HasField("last_seen")),
        register_time=timestamp(message.register_time, message.HasField("register_time")),
        tags=tuple(message.tags),
        raw=message,
        spare=message.spare,
        queued_task=message.queued_task,
        queued_tasks=message.queued_tasks,
    )
