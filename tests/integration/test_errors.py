"""Bad input: each refusal has its own code and ErrorInfo reason, and the server serves on."""

from __future__ import annotations

import uuid

import grpc
import pytest

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .helpers import error_info, seconds, struct, submit, wait_terminal


def _refused(call, request):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, timeout=10)
        if hasattr(result, "__iter__"):
            list(result)
    return error_info(caught.value)


def test_missing_task_name_is_invalid_argument_missing_field(tasks):  # type: ignore[no-untyped-def]
    code, reason, _, fields = _refused(tasks.SubmitTask, spb.SubmitTaskRequest())
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD", ["task"])


def test_unknown_task_name_is_invalid_argument_unknown_task(tasks):  # type: ignore[no-untyped-def]
    code, reason, _, fields = _refused(tasks.SubmitTask, spb.SubmitTaskRequest(task="no.such.task"))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TASK", ["task"])


def test_a_huge_task_name_is_refused_with_a_bounded_error(tasks):  # type: ignore[no-untyped-def]
    # The error quotes the name; unbounded, its trailers would pass the client's 16 KiB
    # metadata limit and the client would see RESOURCE_EXHAUSTED instead.
    name = "x" * 10_000
    with pytest.raises(grpc.RpcError) as caught:
        tasks.SubmitTask(spb.SubmitTaskRequest(task=name), timeout=10)
    code, reason, _metadata, fields = error_info(caught.value)
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TASK", ["task"])
    assert len(caught.value.details()) <= 512
    assert "more characters" in caught.value.details()


def test_arguments_of_the_wrong_shape_are_invalid_arguments(tasks):  # type: ignore[no-untyped-def]
    req = spb.SubmitTaskRequest(task="demo.sleep", args=struct({"secs": 1}))
    code, reason, _, fields = _refused(tasks.SubmitTask, req)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENTS",
        ["args"],
    )
    req = spb.SubmitTaskRequest(task="demo.sleep", args=struct({"seconds": "long"}))
    code, reason, _, fields = _refused(tasks.SubmitTask, req)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENTS",
        ["args"],
    )


def test_arguments_over_the_size_limit_are_args_too_large(tasks):  # type: ignore[no-untyped-def]
    req = spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": "x" * 100_000}))
    code, reason, _metadata, fields = _refused(tasks.SubmitTask, req)
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "ARGS_TOO_LARGE", ["args"])


def test_unknown_task_id_is_not_found(tasks):  # type: ignore[no-untyped-def]
    code, reason, metadata, _ = _refused(
        tasks.GetTask, spb.GetTaskRequest(name="tasks/doesnotexist")
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND")
    assert metadata["name"] == "tasks/doesnotexist"
    code, reason, _, _ = _refused(
        tasks.InterruptTask, spb.InterruptTaskRequest(name="tasks/doesnotexist")
    )
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND")


def test_malformed_task_name_is_invalid_name(tasks):  # type: ignore[no-untyped-def]
    code, reason, _, fields = _refused(tasks.GetTask, spb.GetTaskRequest(name="jobs/1"))
    assert (code, reason, fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME", ["name"])


def test_malformed_resume_token_is_invalid_argument(tasks):  # type: ignore[no-untyped-def]
    req = spb.StreamTaskStatusRequest(resume_token="garbage!")
    code, reason, _, fields = _refused(tasks.StreamTaskStatus, req)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_RESUME_TOKEN",
        ["resume_token"],
    )


def test_a_malformed_name_in_a_names_filter_is_invalid_filter_naming_it(tasks):  # type: ignore[no-untyped-def]
    names = spb.TaskFilter(names=["tasks/fine", "jobs/1", "tasks/bad name"])
    for method, request in (
        (tasks.StreamTaskStatus, spb.StreamTaskStatusRequest(filter=names)),
        (tasks.ListTasks, spb.ListTasksRequest(filter=names)),
    ):
        code, reason, metadata, fields = _refused(method, request)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
        assert fields == ["filter.names[1]", "filter.names[2]"]
        assert metadata["field"] == "filter.names[1]"


def test_a_names_filter_over_a_thousand_names_is_invalid_filter(tasks):  # type: ignore[no-untyped-def]
    names = [f"tasks/t{i}" for i in range(1001)]
    request = spb.StreamTaskStatusRequest(filter=spb.TaskFilter(names=names))
    code, reason, _, fields = _refused(tasks.StreamTaskStatus, request)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FILTER",
        ["filter.names"],
    )
    listed = tasks.ListTasks(
        spb.ListTasksRequest(filter=spb.TaskFilter(names=names[:1000])), timeout=10
    )
    assert list(listed.tasks) == []  # a thousand is allowed (and none of these exist)


def test_bad_page_token_is_invalid_page_token(tasks):  # type: ignore[no-untyped-def]
    code, reason, _, fields = _refused(tasks.ListTasks, spb.ListTasksRequest(page_token="nope"))
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


def test_page_token_with_another_filter_is_refused(tasks):  # type: ignore[no-untyped-def]
    for _ in range(3):
        submit(tasks, "demo.echo", args={"value": 1})
    page = tasks.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10)
    assert page.next_page_token
    req = spb.ListTasksRequest(
        page_size=1, page_token=page.next_page_token, filter=spb.TaskFilter(tasks=["demo.echo"])
    )
    code, reason, _, _ = _refused(tasks.ListTasks, req)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


def test_negative_page_size_is_invalid_page_size(tasks):  # type: ignore[no-untyped-def]
    code, reason, _, fields = _refused(tasks.ListTasks, spb.ListTasksRequest(page_size=-1))
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_SIZE",
        ["page_size"],
    )


def test_interrupt_of_a_finished_task_is_failed_precondition(tasks):  # type: ignore[no-untyped-def]
    task = submit(tasks, "demo.echo", args={"value": 1})
    assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED
    code, reason, metadata, _ = _refused(
        tasks.InterruptTask, spb.InterruptTaskRequest(name=task.name)
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TASK_ALREADY_TERMINAL")
    assert metadata.get("state") == "TASK_STATE_SUCCEEDED"


def test_reused_request_id_with_another_payload_is_already_exists(tasks):  # type: ignore[no-untyped-def]
    rid = str(uuid.uuid4())
    first = tasks.SubmitTask(
        spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": 1}), request_id=rid),
        timeout=10,
    )
    again = tasks.SubmitTask(
        spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": 1}), request_id=rid),
        timeout=10,
    )
    assert (again.task.name, again.deduplicated) == (first.task.name, True)
    req = spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": 2}), request_id=rid)
    code, reason, _, _ = _refused(tasks.SubmitTask, req)
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")


def test_grace_over_the_server_limit_is_invalid_grace(tasks):  # type: ignore[no-untyped-def]
    req = spb.SubmitTaskRequest(
        task="demo.echo", args=struct({"value": 1}), grace=tpb.GracePeriods(sigint=seconds(10_000))
    )
    code, reason, _, fields = _refused(tasks.SubmitTask, req)
    assert (code, reason, fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_GRACE",
        ["grace.sigint"],
    )


def test_server_keeps_serving_after_bad_input(tasks):  # type: ignore[no-untyped-def]
    task = submit(tasks, "demo.echo", args={"value": "still here"})
    assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED
