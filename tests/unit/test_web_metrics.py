"""Metrics derived from published events, lagging cut-offs, JSON logs, gateway errors:
the HTTP side's logic without sockets."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging

import pytest
from prometheus_client import CollectorRegistry

from tether_server.api.errors import to_status
from tether_server.core import errors as err
from tether_server.core.eventlog import LogEntry
from tether_server.core.filters import TaskFilter
from tether_server.core.messages import EventKind
from tether_server.core.model import (
    AttemptEnding,
    ErrorReason,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    InterruptRecord,
    ResourceReport,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from tether_server.flags import parse_args
from tether_server.logformat import EventLogger, JsonFormatter
from tether_server.subscriptions import StreamOptions, SubscriberIndex, Subscription
from tether_server.web.gateway import connect_error
from tether_server.web.metrics import TaskMetrics


class Events:
    """Feeds TaskMetrics the snapshots the controller would publish."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = TaskMetrics(self.registry)
        self.revision = 0

    def publish(self, task: Task, at: float, kind: EventKind = EventKind.STATE_CHANGED) -> None:
        self.revision += 1
        self.metrics.observe(LogEntry(self.revision, kind, dataclasses.replace(task), at))

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_a_task_is_counted_once_submitted_once_finished_with_its_queue_wait_and_run_time() -> None:
    ev = Events()
    task = Task("t1", "demo.count", {}, create_time=10.0)
    ev.publish(task, 10.0)
    task.state, task.attempt, task.start_time, task.engine_id = TaskState.RUNNING, 1, 10.5, 0
    ev.publish(task, 10.5)
    ev.publish(task, 10.6, EventKind.PROGRESS)
    ev.publish(task, 10.7, EventKind.OUTPUT)
    task.state, task.end_time = TaskState.SUCCEEDED, 12.5
    ev.publish(task, 12.5)
    assert ev.value("tether_tasks_submitted_total", task="demo.count") == 1
    labels = {"task": "demo.count", "state": "SUCCEEDED", "reason": "NONE"}
    assert ev.value("tether_tasks_finished_total", **labels) == 1
    assert ev.value("tether_task_dispatch_latency_seconds_sum", task="demo.count") == 0.5
    run = {"task": "demo.count", "state": "SUCCEEDED"}
    assert ev.value("tether_task_run_duration_seconds_sum", **run) == 2.0
    assert ev.value("tether_task_output_chunks_total", task="demo.count") == 1


def test_interrupt_latency_runs_from_the_request_to_the_end_by_final_stage() -> None:
    ev = Events()
    task = Task("t2", "demo.c_call", {}, create_time=1.0)
    ev.publish(task, 1.0)
    task.state, task.attempt, task.start_time = TaskState.RUNNING, 1, 1.0
    ev.publish(task, 1.0)
    task.state = TaskState.INTERRUPTING
    task.interrupt = InterruptRecord("alice", "stop", 2.0, InterruptCause.USER, GracePeriods())
    ev.publish(task, 2.0)
    ev.publish(task, 2.5, EventKind.UPDATED)  # escalation: counted once all the same
    task.interrupt.final_stage = EscalationStage.SIGKILL
    task.state, task.end_time = TaskState.INTERRUPTED, 3.25
    task.error = TaskError(ErrorReason.INTERRUPTED)
    task.resources = ResourceReport(reclaimed=False, engine_recycled=True)
    ev.publish(task, 3.25)
    assert ev.value("tether_interrupts_requested_total", task="demo.c_call", cause="USER") == 1
    assert ev.value("tether_interrupt_latency_seconds_sum", final_stage="SIGKILL") == 1.25
    assert ev.value("tether_interrupt_latency_seconds_count", final_stage="SIGKILL") == 1
    back = {"final_stage": "SIGKILL", "recycled": "true"}
    assert ev.value("tether_interrupt_memory_reclaimed_seconds_count", **back) == 1
    assert ev.value("tether_engine_recycles_total", task="demo.c_call") == 1
    finished = {"task": "demo.c_call", "state": "INTERRUPTED", "reason": "INTERRUPTED"}
    assert ev.value("tether_tasks_finished_total", **finished) == 1


def test_a_retried_attempt_is_not_a_new_submission() -> None:
    ev = Events()
    task = Task("t3", "demo.sleep", {}, create_time=0.0)
    ev.publish(task, 0.0)
    task.state, task.attempt = TaskState.RUNNING, 1
    ev.publish(task, 0.1)
    task.state = TaskState.PENDING  # preempted or retried: back in the queue
    ev.publish(task, 5.0)
    task.state, task.attempt = TaskState.RUNNING, 2
    ev.publish(task, 6.0)
    assert ev.value("tether_tasks_submitted_total", task="demo.sleep") == 1
    assert ev.value("tether_task_dispatch_latency_seconds_count", task="demo.sleep") == 2
    assert ev.value("tether_task_dispatch_latency_seconds_sum", task="demo.sleep") == pytest.approx(
        1.1
    )


def test_requeued_attempts_are_counted_by_ending_and_reason() -> None:
    ev = Events()
    task = Task("t4", "llm.generate", {}, create_time=0.0)
    ev.publish(task, 0.0)
    task.state, task.attempt = TaskState.RUNNING, 1
    task.attempts = [TaskAttempt(1, 0, 0.1)]
    ev.publish(task, 0.1)
    task.state = TaskState.PENDING
    task.attempts = [TaskAttempt(1, 0, 0.1, 2.0, AttemptEnding.PREEMPTED, "PREEMPTED")]
    ev.publish(task, 2.0)
    labels = {"task": "llm.generate", "ending": "PREEMPTED", "reason": "PREEMPTED"}
    assert ev.value("tether_task_attempts_requeued_total", **labels) == 1
    assert ev.value("tether_tasks_submitted_total", task="llm.generate") == 1


def test_lagging_cut_offs_are_counted_once_per_subscriber() -> None:
    index = SubscriberIndex()
    slow = Subscription(StreamOptions(None, TaskFilter(), False, False), 2, [])
    index.add(slow)
    task = Task("a", "demo.echo", {})
    for revision in range(1, 6):
        index.deliver(LogEntry(revision, EventKind.STATE_CHANGED, task, 0.0))
    assert index.lagging_cutoffs == 1


def test_json_log_lines_carry_task_and_engine_fields() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "tether_server.events", logging.INFO, __file__, 1, "task %s", ("x",), None
    )
    record.task_id, record.engine_id = "abc", 3
    line = json.loads(formatter.format(record))
    assert line["message"] == "task x" and line["task_id"] == "abc" and line["engine_id"] == 3
    assert line["level"] == "INFO" and line["time"].endswith("Z")


def test_event_logger_writes_one_line_per_state_change(caplog: pytest.LogCaptureFixture) -> None:
    task = Task("abc", "demo.echo", {}, state=TaskState.RUNNING, engine_id=1)
    with caplog.at_level(logging.INFO, logger="tether_server.events"):
        EventLogger()(LogEntry(1, EventKind.STATE_CHANGED, task, 0.0))
        EventLogger()(LogEntry(2, EventKind.OUTPUT, task, 0.0, "chunk"))
    (record,) = caplog.records
    assert record.__dict__["task_id"] == "abc" and record.__dict__["engine_id"] == 1


def test_connect_errors_keep_the_code_message_and_error_info() -> None:
    status = to_status(
        err.TaskNotFound("task tasks/x does not exist", metadata={"name": "tasks/x"})
    )
    error = connect_error(status)
    assert error["code"] == "not_found" and error["message"] == "task tasks/x does not exist"
    (detail,) = error["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    assert detail["debug"] == {
        "reason": "TASK_NOT_FOUND",
        "domain": "tether.dev",
        "metadata": {"name": "tasks/x"},
    }
    raw = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
    assert b"TASK_NOT_FOUND" in raw


def test_http_defaults_to_the_next_port_and_can_be_turned_off() -> None:
    config, _ = parse_args(["--listen", "127.0.0.1:50051"])
    assert config.http_listen == "127.0.0.1:50052" and not config.http_required
    config, _ = parse_args(["--http", "0.0.0.0:9000", "--log-format", "json"])
    assert config.http_listen == "0.0.0.0:9000" and config.http_required
    assert config.log_format == "json"
    config, _ = parse_args(["--no-http"])
    assert config.http_listen == ""
    with pytest.raises(SystemExit):
        parse_args(["--no-http", "--metrics-listen", "127.0.0.1:9100"])
