"""Retry policies, preemptible and attempts in the Python client and the CLI, without a server."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console

import tether
from tether import _convert, _core, _render, cli
from tether.v1 import task_pb2
from tether.v1 import task_service_pb2 as spb


def _request(**kwargs: object) -> spb.SubmitTaskRequest:
    fields: dict[str, object] = {
        "args": None,
        "labels": None,
        "priority": 0,
        "timeout": None,
        "grace": None,
        "request_id": "r",
        "resume_from": None,
        "required_tags": None,
        "queue_timeout": None,
    }
    fields.update(kwargs)
    return _core.submit_request("llm.generate", **fields)  # type: ignore[arg-type]


def _attempted_task() -> task_pb2.Task:
    pb = task_pb2.Task(name="tasks/t1", task="llm.generate", attempt=2, preemptible=True)
    pb.state = task_pb2.TASK_STATE_SUCCEEDED
    first = pb.attempts.add(attempt=1, engine_id=0, reason="PREEMPTED", ended_by="tasks/u")
    first.ending = task_pb2.ATTEMPT_ENDING_PREEMPTED
    first.start_time.FromSeconds(100)
    first.end_time.FromSeconds(103)
    second = pb.attempts.add(attempt=2, engine_id=1, ending=task_pb2.ATTEMPT_ENDING_FINAL)
    second.start_time.FromSeconds(104)
    second.end_time.FromSeconds(110)
    pb.retry.max_attempts = 3
    pb.retry.retry_on.append("ENGINE_LOST")
    return pb


def test_submit_sends_the_retry_policy_and_preemptible() -> None:
    policy = tether.TaskRetryPolicy(
        max_attempts=4, retry_on=("TASK_RAISED",), initial_backoff=timedelta(seconds=0.5)
    )
    request = _request(retry=policy, preemptible=False)
    assert request.retry.max_attempts == 4
    assert list(request.retry.retry_on) == ["TASK_RAISED"]
    assert request.retry.initial_backoff.ToNanoseconds() == 500_000_000
    assert not request.retry.HasField("max_backoff")
    assert request.HasField("preemptible") and not request.preemptible


def test_submit_without_them_leaves_the_server_to_decide() -> None:
    request = _request()
    assert not request.HasField("retry") and not request.HasField("preemptible")


def test_attempts_and_the_policy_come_back_as_dataclasses() -> None:
    task = _convert.task_from_proto(_attempted_task())
    assert task.preemptible
    assert task.retry is not None and task.retry.retry_on == ("ENGINE_LOST",)
    first, second = task.attempts
    assert first.ending is tether.AttemptEnding.PREEMPTED and first.ended_by == "tasks/u"
    assert first.end_time is not None and first.start_time is not None
    assert (first.end_time - first.start_time).total_seconds() == 3
    assert second.engine_id == 1 and second.reason == ""


def test_tether_get_shows_every_attempt() -> None:
    console = Console(width=160, record=True)
    console.print(_render.task_details(_convert.task_from_proto(_attempted_task())))
    text = console.export_text()
    assert "attempts:" in text
    assert "preempted" in text and "PREEMPTED by tasks/u" in text
    assert "final" in text
    assert "up to 3 attempts on ENGINE_LOST" in text


def test_the_submit_command_builds_a_retry_policy_from_its_flags() -> None:
    args = cli.build_parser().parse_args(
        ["submit", "llm.generate", "--retry", "5", "--retry-on", "engine_lost,timed_out"]
    )
    policy = cli._retry(args)
    assert policy == tether.TaskRetryPolicy(max_attempts=5, retry_on=("ENGINE_LOST", "TIMED_OUT"))
    only_reasons = cli.build_parser().parse_args(["submit", "x", "--retry-on", "TASK_RAISED"])
    assert cli._retry(only_reasons) == tether.TaskRetryPolicy(retry_on=("TASK_RAISED",))
    plain = cli.build_parser().parse_args(["submit", "x", "--no-preemptible"])
    assert cli._retry(plain) is None and plain.preemptible is False


def _output_event(attempt: int, chunk: str) -> tether.TaskEvent:
    pb = task_pb2.Task(name="tasks/t1", attempt=attempt, state=task_pb2.TASK_STATE_RUNNING)
    return tether.TaskEvent(
        type=tether.TaskEventType.OUTPUT,
        task=_convert.task_from_proto(pb),
        output_chunk=chunk,
        revision=1,
        event_time=None,
        resume_token="",
        raw=spb.TaskEvent(),
    )


def test_the_progress_view_does_not_print_a_resumed_attempts_replayed_text_twice() -> None:
    console = Console(width=80, record=True, force_terminal=False)
    with _render.TaskProgress(console) as progress:
        progress.show(_output_event(1, "one two "))
        progress.show(_output_event(1, "three\n"))
        progress.show(_output_event(2, "one two three\n"))  # the checkpoint's replay
        progress.show(_output_event(2, "four\n"))
        progress.flush()
    text = console.export_text()
    assert text.count("one two three") == 1 and "four" in text
