"""Protobuf <-> domain conversion: the only place that knows both shapes."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from ..core import model as m
from ..core.eventlog import encode_token
from ..core.filters import TaskFilter
from ..core.messages import EventKind
from ..loads import EngineLoad

BASIC = tpb.TASK_VIEW_BASIC
FULL = tpb.TASK_VIEW_FULL


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def seconds_of(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e9


def to_value(obj: Any) -> struct_pb2.Value:
    """A JSON-shaped Python value as google.protobuf.Value (non-finite floats become strings)."""
    value = struct_pb2.Value()
    try:
        json_format.ParseDict(_finite(obj), value)
    except (json_format.ParseError, TypeError, ValueError):
        value.string_value = repr(obj)
    return value


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return dict(json_format.MessageToDict(s))


def dict_to_struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(_finite(d))
    return s


def grace_to_pb(g: m.GracePeriods) -> tpb.GracePeriods:
    return tpb.GracePeriods(
        sigint=duration(g.sigint), sigterm=duration(g.sigterm), sigkill=duration(g.sigkill)
    )


def retry_to_pb(r: m.RetryPolicy) -> tpb.RetryPolicy:
    return tpb.RetryPolicy(
        max_attempts=r.max_attempts,
        retry_on=sorted(reason.value for reason in r.retry_on),
        initial_backoff=duration(r.initial_backoff),
        max_backoff=duration(r.max_backoff),
        backoff_multiplier=r.multiplier,
        jitter=r.jitter,
    )


def attempt_to_pb(a: m.TaskAttempt) -> tpb.TaskAttempt:
    pb = tpb.TaskAttempt(
        attempt=a.attempt,
        start_time=timestamp(a.start_time),
        ending=tpb.AttemptEnding.ValueType(a.ending.value),
        reason=a.reason,
        message=a.message,
        ended_by=a.ended_by,
    )
    if a.engine_id is not None:
        pb.engine_id = a.engine_id
    if a.end_time is not None:
        pb.end_time.CopyFrom(timestamp(a.end_time))
    return pb


def task_to_pb(task: m.Task, view: int = BASIC) -> tpb.Task:
    """A domain task as tether.v1.Task. BASIC leaves out result, traceback and output."""
    full = view == FULL
    pb = tpb.Task(
        name=task.name,
        task=task.task,
        state=tpb.TaskState.ValueType(task.state.value),
        priority=task.priority,
        attempt=task.attempt,
        create_time=timestamp(task.create_time),
        update_time=timestamp(task.update_time),
        grace=grace_to_pb(task.grace),
        revision=task.revision,
        owner=task.owner,
        resume_from=task.resume_from,
        has_checkpoint=task.has_checkpoint,
        output_truncated=task.output_truncated,
        required_tags=list(task.required_tags),
        preemptible=task.preemptible,
    )
    if task.retry is not None:
        pb.retry.CopyFrom(retry_to_pb(task.retry))
    pb.attempts.extend(attempt_to_pb(a) for a in task.attempts)
    pb.args.CopyFrom(dict_to_struct(task.args))
    pb.labels.update(task.labels)
    if task.engine_id is not None:
        pb.engine_id = task.engine_id
    if task.start_time is not None:
        pb.start_time.CopyFrom(timestamp(task.start_time))
    if task.end_time is not None:
        pb.end_time.CopyFrom(timestamp(task.end_time))
    if task.timeout is not None:
        pb.timeout.CopyFrom(duration(task.timeout))
    if task.queue_timeout is not None:
        pb.queue_timeout.CopyFrom(duration(task.queue_timeout))
    if task.progress_fraction or task.progress_message:
        pb.progress.fraction = task.progress_fraction
        pb.progress.message = task.progress_message
    if full or task.state.terminal:
        pb.output = task.output
    if task.interrupt is not None:
        i = task.interrupt
        pb.interrupt.CopyFrom(
            tpb.InterruptRecord(
                requested_by=i.requested_by,
                reason=i.reason,
                request_time=timestamp(i.request_time),
                cause=tpb.InterruptCause.ValueType(i.cause.value),
                stage=tpb.EscalationStage.ValueType(i.stage.value),
                final_stage=tpb.EscalationStage.ValueType(i.final_stage.value),
                grace=grace_to_pb(i.grace),
            )
        )
    if task.error is not None:
        e = task.error
        pb.error.CopyFrom(
            tpb.TaskError(
                reason=str(e.reason),
                type=e.type,
                message=e.message,
                traceback=e.traceback if full else "",
            )
        )
    if full and task.state is m.TaskState.SUCCEEDED:
        pb.result.CopyFrom(to_value(task.result))
    if task.resources is not None:
        r = task.resources
        pb.resources.CopyFrom(
            tpb.ResourceReport(
                rss_before_bytes=r.rss_before_bytes,
                rss_after_bytes=r.rss_after_bytes,
                gpu_allocated_before_bytes=r.gpu_allocated_before_bytes,
                gpu_allocated_after_bytes=r.gpu_allocated_after_bytes,
                gpu_reserved_after_bytes=r.gpu_reserved_after_bytes,
                leftover_children=r.leftover_children,
                reclaimed=r.reclaimed,
                engine_recycled=r.engine_recycled,
                summary=r.summary,
            )
        )
    return pb


def event_response(
    epoch: str,
    revision: int,
    kind: EventKind | int,
    task: m.Task,
    time: float,
    chunk: str,
    view: int = BASIC,
) -> spb.StreamTaskStatusResponse:
    return spb.StreamTaskStatusResponse(
        resume_token=encode_token(epoch, revision),
        task_event=spb.TaskEvent(
            type=spb.TaskEventType.ValueType(kind.value if isinstance(kind, EventKind) else kind),
            task=task_to_pb(task, view),
            event_time=timestamp(time),
            output_chunk=chunk,
            revision=revision,
        ),
    )


def snapshot_response(
    epoch: str, token_revision: int, task: m.Task, view: int
) -> spb.StreamTaskStatusResponse:
    return spb.StreamTaskStatusResponse(
        resume_token=encode_token(epoch, token_revision),
        task_event=spb.TaskEvent(
            type=spb.TASK_EVENT_TYPE_SNAPSHOT,
            task=task_to_pb(task, view),
            event_time=timestamp(task.update_time),
            revision=task.revision,
        ),
    )


def checkpoint_response(
    epoch: str, revision: int, now: float, initial: bool = False
) -> spb.StreamTaskStatusResponse:
    return spb.StreamTaskStatusResponse(
        resume_token=encode_token(epoch, revision),
        checkpoint=spb.StreamCheckpoint(
            initial_state_complete=initial, revision=revision, time=timestamp(now)
        ),
    )


def filter_from_pb(f: spb.TaskFilter) -> TaskFilter:
    return TaskFilter(
        states=frozenset(m.TaskState(s) for s in f.states),
        tasks=frozenset(f.tasks),
        labels=dict(f.labels),
        ids=frozenset(name.removeprefix("tasks/") for name in f.names),
    )


def engine_to_pb(e: m.Engine) -> cpb.Engine:
    pb = cpb.Engine(
        id=e.id,
        host=e.host,
        pid=e.pid,
        state=cpb.EngineState.ValueType(e.state.value),
        current_task=f"tasks/{e.current_task}" if e.current_task else "",
        queued_task=f"tasks/{e.queued_task}" if e.queued_task else "",
        queued_tasks=e.queued_count,
        tasks_done=e.tasks_done,
        tags=sorted(e.tags),
        spare=e.spare,
    )
    if e.last_seen:
        pb.last_seen.CopyFrom(timestamp(e.last_seen))
    if e.register_time:
        pb.register_time.CopyFrom(timestamp(e.register_time))
    return pb


def engine_load_to_pb(load: EngineLoad) -> cpb.EngineLoad:
    """An engine's own load report (loads.py) as GetCluster shows it."""
    pb = cpb.EngineLoad(
        rss_bytes=load.rss_bytes,
        cpu_percent=load.cpu_percent,
        gpu_memory_used_bytes=load.gpu_memory_used_bytes,
        gpu_memory_total_bytes=load.gpu_memory_total_bytes,
    )
    pb.report_time.CopyFrom(timestamp(load.time))
    return pb
