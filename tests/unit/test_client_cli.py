"""The ``tether`` command's parsing, exit codes, error lines and JSON, without a server."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import grpc
import pytest
from rich.console import Console

import tether
from tether import _convert, _render, cli
from tether.v1 import cluster_service_pb2, task_pb2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5), ("2m", 120), ("1h", 3600), ("1.5", 1.5), (" 30s ", 30)],
)
def test_durations_read_like_people_write_them(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5y", "-1s", "s", "1e3"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", 20),
        ("0.05", 0.05),
        ("true", True),
        ("null", None),
        ('"20"', "20"),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ("hello", "hello"),
        ("hello world", "hello world"),
        ("", ""),
    ],
)
def test_arg_values_are_json_when_they_parse_and_strings_otherwise(
    text: str, value: object
) -> None:
    assert cli.parse_arg_value(text) == value


def test_pairs_split_at_the_first_equals_sign() -> None:
    assert cli.parse_pair("query=a=b") == ("query", "a=b")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_pair("novalue")


@pytest.mark.parametrize("text", ["running", "RUNNING", "task_state_running", "Running"])
def test_states_are_read_in_any_case(text: str) -> None:
    assert cli.parse_state(text) is tether.TaskState.RUNNING


def test_unknown_states_are_refused_with_the_choices() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="timed_out"):
        cli.parse_state("done")


def _task(state: int, reason: str = "") -> tether.Task:
    message = task_pb2.Task(name="tasks/t1", task="demo.sleep", state=state)  # type: ignore[arg-type]
    if reason:
        message.error.reason = reason
        message.error.message = "stopped"
    return _convert.task_from_proto(message)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (tether.TaskFailed(_task(task_pb2.TASK_STATE_FAILED, "TASK_RAISED")), 1),
        (tether.TaskInterrupted(_task(task_pb2.TASK_STATE_INTERRUPTED, "INTERRUPTED")), 3),
        (tether.TaskCancelled(_task(task_pb2.TASK_STATE_CANCELLED, "CANCELLED")), 3),
        (tether.TaskTimedOut(_task(task_pb2.TASK_STATE_TIMED_OUT, "TIMED_OUT")), 4),
        (tether.InvalidArgument("bad", reason="INVALID_LABELS"), 2),
        (cli.UsageError("unrecognized arguments: --bogus"), 2),
        (tether.TaskNotFound("no", code=grpc.StatusCode.NOT_FOUND), 5),
        (tether.Unavailable("down", code=grpc.StatusCode.UNAVAILABLE), 6),
        (tether.TaskAlreadyTerminal("done", code=grpc.StatusCode.FAILED_PRECONDITION), 1),
    ],
)
def test_exit_codes_follow_the_outcome(error: BaseException, code: int) -> None:
    assert cli.exit_code_for(error) == code


def test_an_error_is_one_line_with_its_reason() -> None:
    error = tether.TaskNotFound(
        "task tasks/x does not exist", code=grpc.StatusCode.NOT_FOUND, reason="TASK_NOT_FOUND"
    )
    assert cli.error_line(error, "here:1") == "error: TASK_NOT_FOUND: task tasks/x does not exist"


def test_an_unreachable_server_is_named_in_the_error_line() -> None:
    error = tether.Unavailable(
        "failed to connect\nto all addresses", code=grpc.StatusCode.UNAVAILABLE
    )
    line = cli.error_line(error, "127.0.0.1:9")
    assert "\n" not in line
    assert line.startswith("error: UNAVAILABLE: cannot reach the tether server at 127.0.0.1:9")


def test_an_invalid_argument_line_lists_the_fields() -> None:
    error = tether.InvalidArgument(
        "bad request",
        reason="INVALID_GRACE",
        violations=[tether.FieldViolation("grace.sigint", "too long")],
    )
    assert cli.error_line(error, "x") == (
        "error: INVALID_GRACE: bad request (grace.sigint: too long)"
    )


def test_an_interrupted_task_line_says_who_and_which_stage() -> None:
    message = task_pb2.Task(name="tasks/t1", state=task_pb2.TASK_STATE_INTERRUPTED)
    message.error.reason = "INTERRUPTED"
    message.interrupt.requested_by = "alice"
    message.interrupt.reason = "wrong prompt"
    message.interrupt.final_stage = task_pb2.ESCALATION_STAGE_SIGINT
    error = tether.TaskInterrupted(_convert.task_from_proto(message))
    assert cli.error_line(error, "x") == (
        "error: INTERRUPTED: task tasks/t1 ended INTERRUPTED"
        " (interrupt by alice, stage SIGINT, reason: wrong prompt)"
    )


def test_usage_errors_print_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["submit", "demo.echo", "--priority", "high"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: argument --priority: invalid int value: 'high'")


def test_common_options_are_accepted_before_and_after_the_command() -> None:
    parser = cli.build_parser()
    before = parser.parse_args(["--output", "json", "--address", "a:1", "cluster"])
    after = parser.parse_args(["cluster", "--output", "json", "--address", "a:1"])
    neither = parser.parse_args(["cluster"])
    assert (before.output, before.address) == (after.output, after.address) == ("json", "a:1")
    assert (neither.output, neither.address) == ("text", "")


def test_json_output_is_plain_data_with_names_times_and_seconds() -> None:
    message = task_pb2.Task(
        name="tasks/t1", task="demo.echo", state=task_pb2.TASK_STATE_SUCCEEDED, engine_id=0
    )
    message.timeout.FromTimedelta(timedelta(seconds=30))
    message.create_time.FromSeconds(0)
    message.result.string_value = "hi"
    data = json.loads(_render.dumps(_convert.task_from_proto(message)))
    assert data["id"] == "t1"
    assert data["state"] == "SUCCEEDED"
    assert data["engine_id"] == 0
    assert data["timeout"] == 30.0
    assert data["create_time"] == "1970-01-01T00:00:00+00:00"
    assert data["result"] == "hi"
    assert "raw" not in data


def test_an_interrupted_task_line_does_not_repeat_what_the_server_already_said() -> None:
    message = task_pb2.Task(name="tasks/t1", state=task_pb2.TASK_STATE_INTERRUPTED)
    message.error.reason = "INTERRUPTED"
    message.error.message = "stopped at stage SIGINT after an interrupt by alice: wrong prompt"
    message.interrupt.requested_by = "alice"
    message.interrupt.reason = "wrong prompt"
    error = tether.TaskInterrupted(_convert.task_from_proto(message))
    assert cli.error_line(error, "x") == (
        "error: INTERRUPTED: task tasks/t1 ended INTERRUPTED: "
        "stopped at stage SIGINT after an interrupt by alice: wrong prompt"
    )


def cluster_text(cluster: tether.Cluster) -> str:
    """What ``tether cluster`` prints for ``cluster``, on a wide terminal."""
    console = Console(width=200, record=True)
    console.print(_render.cluster_view(cluster))
    return console.export_text()


def test_the_cluster_table_shows_how_many_tasks_wait_on_each_engine() -> None:
    message = cluster_service_pb2.GetClusterResponse(cluster_id="c1", target_size=1, serving=True)
    message.engines.add(
        id=0, state=cluster_service_pb2.ENGINE_STATE_BUSY, current_task="tasks/t1",
        queued_tasks=3, host="h", pid=7, tasks_done=12,
    )  # fmt: skip
    lines = cluster_text(_convert.cluster_from_proto(message)).splitlines()
    header = next(line for line in lines if "ENGINE" in line)
    row = next(line for line in lines if "BUSY" in line)
    assert header.split()[:4] == ["ENGINE", "STATE", "TASK", "QUEUED"]
    assert row.split()[:4] == ["0", "BUSY", "t1", "3"]


def test_the_cluster_lists_the_models_and_the_unschedulable_tasks() -> None:
    message = cluster_service_pb2.GetClusterResponse(
        cluster_id="c1", model_paths_allowed=True, unschedulable_tasks=["tasks/t9"]
    )
    message.models.add(name="qwen", kind="hf", context_length=4096, chat=True)
    message.models.add(name="tiny", kind="builtin", context_length=2048)
    cluster = _convert.cluster_from_proto(message)
    assert cluster.models == (
        tether.Model(name="qwen", kind="hf", context_length=4096, chat=True),
        tether.Model(name="tiny", kind="builtin", context_length=2048, chat=False),
    )
    assert cluster.model_paths_allowed
    assert cluster.unschedulable_tasks == ("tasks/t9",)
    assert "models: qwen, tiny" in cluster_text(cluster)
