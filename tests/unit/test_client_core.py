"""The client's I/O-free core: requests, conversions, retry policy and error mapping."""

from __future__ import annotations

import pickle
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2

import tether
from tether import _convert, _core
from tether.v1 import task_pb2, task_service_pb2


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    domain: str = "tether.dev",
    violations: tuple[tuple[str, str], ...] = (),
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {}))
    details.append(info)
    if violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
        details.append(bad_request)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


# --------------------------------------------------------------------------- names and requests


@pytest.mark.parametrize("given", ["abc123", "tasks/abc123"])
def test_task_name_accepts_bare_ids_and_full_names(given: str) -> None:
    assert _core.task_name(given) == "tasks/abc123"


def test_task_name_refuses_an_empty_name() -> None:
    with pytest.raises(ValueError):
        _core.task_name("")


def test_submit_request_carries_every_argument_and_a_fresh_uuid4_request_id() -> None:
    request = _core.submit_request(
        "demo.echo",
        args={"message": "hi", "n": 3, "nested": {"xs": [1, 2.5, None, True]}},
        labels={"team": "search"},
        priority=7,
        timeout=1.5,
        grace=timedelta(seconds=2),
        request_id=None,
        resume_from="abc",
        required_tags=["gpu"],
        queue_timeout=timedelta(minutes=1),
    )
    assert request.task == "demo.echo"
    assert _convert.python_struct(request.args) == {
        "message": "hi",
        "n": 3,
        "nested": {"xs": [1, 2.5, None, True]},
    }
    assert dict(request.labels) == {"team": "search"}
    assert request.priority == 7
    assert request.timeout.ToTimedelta() == timedelta(seconds=1.5)
    assert request.grace.sigint.ToTimedelta() == timedelta(seconds=2)
    assert not request.grace.HasField("sigterm")
    assert request.resume_from == "tasks/abc"
    assert list(request.required_tags) == ["gpu"]
    assert request.queue_timeout.ToTimedelta() == timedelta(minutes=1)
    assert uuid.UUID(request.request_id).version == 4


def test_each_submit_request_gets_its_own_request_id_unless_one_is_given() -> None:
    def build(request_id: str | None) -> task_service_pb2.SubmitTaskRequest:
        return _core.submit_request(
            "demo.echo",
            args=None,
            labels=None,
            priority=0,
            timeout=None,
            grace=None,
            request_id=request_id,
            resume_from=None,
            required_tags=None,
            queue_timeout=None,
        )

    assert build(None).request_id != build(None).request_id
    assert build("mine").request_id == "mine"
    assert not build(None).HasField("timeout")


def test_grace_periods_set_each_stage_given() -> None:
    message = _convert.grace_proto(tether.GracePeriods(sigterm=timedelta(seconds=3)))
    assert not message.HasField("sigint")
    assert message.sigterm.ToTimedelta() == timedelta(seconds=3)


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError):
        _convert.duration_proto(-1)


def test_arguments_that_are_not_json_shaped_are_refused() -> None:
    with pytest.raises(TypeError, match="JSON-shaped"):
        _convert.struct_proto({"when": datetime.now()})


def test_interrupt_request_names_the_task_and_keeps_the_grace() -> None:
    request = _core.interrupt_request("abc", reason="stop", grace=5, request_id=None)
    assert request.name == "tasks/abc"
    assert request.reason == "stop"
    assert request.grace.sigint.ToTimedelta() == timedelta(seconds=5)
    assert uuid.UUID(request.request_id).version == 4


def test_get_request_defaults_to_the_full_view() -> None:
    assert _core.get_request("abc", None).view == task_pb2.TASK_VIEW_FULL


def test_list_request_carries_the_filter() -> None:
    request = _core.list_request(
        tether.TaskFilter(
            states=[tether.TaskState.RUNNING], tasks=["demo.sleep"], labels={"a": "b"}
        ),
        page_size=10,
        view=None,
    )
    assert list(request.filter.states) == [task_pb2.TASK_STATE_RUNNING]
    assert list(request.filter.tasks) == ["demo.sleep"]
    assert dict(request.filter.labels) == {"a": "b"}
    assert request.page_size == 10


def test_address_comes_from_the_argument_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TETHER_ADDRESS", raising=False)
    assert _core.client_config(None, 30, None, None, None).address == "127.0.0.1:50051"
    monkeypatch.setenv("TETHER_ADDRESS", "example:1")
    assert _core.client_config(None, 30, None, None, None).address == "example:1"
    assert _core.client_config("given:2", 30, None, None, None).address == "given:2"


def test_a_token_is_sent_as_bearer_authorization() -> None:
    config = _core.client_config(None, 30, None, "s3cret", {"X-Team": "a"})
    assert ("authorization", "Bearer s3cret") in config.metadata
    assert ("x-team", "a") in config.metadata


# --------------------------------------------------------------------------- conversions


def test_integral_json_numbers_come_back_as_int_and_others_as_float() -> None:
    value = struct_pb2.Value()
    value.list_value.extend([20, 2.5, 2**60])
    assert _convert.python_value(value) == [20, 2.5, float(2**60)]
    assert isinstance(_convert.python_value(value)[0], int)


def test_task_conversion_keeps_engine_zero_and_leaves_unset_fields_none() -> None:
    message = task_pb2.Task(
        name="tasks/t1", task="demo.echo", state=task_pb2.TASK_STATE_RUNNING, engine_id=0
    )
    message.create_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5))
    task = _convert.task_from_proto(message)
    assert task.engine_id == 0
    assert task.id == "t1"
    assert task.state is tether.TaskState.RUNNING
    assert task.create_time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert task.start_time is None
    assert task.timeout is None
    assert task.error is None and task.interrupt is None and task.progress is None
    assert task.raw is message
    assert _convert.task_from_proto(task_pb2.Task()).engine_id is None


def test_states_newer_than_the_client_read_as_unspecified() -> None:
    assert _convert.enum_from_proto(tether.TaskState, 99) is tether.TaskState.UNSPECIFIED


def test_terminal_states_are_exactly_the_five_final_ones() -> None:
    terminal = {state for state in tether.TaskState if state.is_terminal}
    assert terminal == {
        tether.TaskState.SUCCEEDED,
        tether.TaskState.FAILED,
        tether.TaskState.INTERRUPTED,
        tether.TaskState.TIMED_OUT,
        tether.TaskState.CANCELLED,
    }


def test_tasks_are_hashable_despite_their_dict_fields() -> None:
    task = _convert.task_from_proto(task_pb2.Task(name="tasks/a", revision=3))
    assert len({task, task}) == 1


# --------------------------------------------------------------------------- retries


def test_backoff_doubles_from_100ms_up_to_5s_and_starts_over_after_reset() -> None:
    backoff = _core.Backoff(tether.RetryPolicy(jitter=0))
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)


def test_jitter_keeps_each_delay_within_its_spread() -> None:
    backoff = _core.Backoff(tether.RetryPolicy(jitter=0.5))
    delays = []
    for _ in range(50):
        backoff.reset()
        delays.append(backoff.next_delay())
    assert all(0.05 <= delay <= 0.15 for delay in delays)
    assert len(set(delays)) > 1


def _config(max_attempts: int = 5) -> _core.ClientConfig:
    policy = tether.RetryPolicy(jitter=0, max_attempts=max_attempts)
    return _core.client_config(None, 30, policy, None, None)


def test_unary_calls_retry_unavailable_a_few_times_then_give_up() -> None:
    attempts = _core.UnaryAttempts(_config(max_attempts=3))
    unavailable = tether.Unavailable("down", code=grpc.StatusCode.UNAVAILABLE)
    delays = []
    for _ in range(5):
        attempts.timeout()
        delays.append(attempts.retry_delay(unavailable))
    assert delays[:2] == pytest.approx([0.1, 0.2])
    assert delays[2] is None


@pytest.mark.parametrize(
    "error",
    [
        tether.InvalidArgument("bad"),
        tether.TaskNotFound("gone", code=grpc.StatusCode.NOT_FOUND),
        tether.DeadlineExceeded("slow", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        tether.TetherError("boom", code=grpc.StatusCode.INTERNAL),
    ],
)
def test_unary_calls_never_retry_anything_but_unavailable(error: tether.TetherError) -> None:
    attempts = _core.UnaryAttempts(_config())
    attempts.timeout()
    assert attempts.retry_delay(error) is None


def test_a_retry_that_would_end_past_the_deadline_is_not_made() -> None:
    config = _core.client_config(None, 0.05, tether.RetryPolicy(initial_backoff=1), None, None)
    attempts = _core.UnaryAttempts(config)
    attempts.timeout()
    assert attempts.retry_delay(tether.Unavailable("down")) is None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND", tether.TaskNotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, "TASK_ALREADY_TERMINAL", tether.TaskAlreadyTerminal),
        (grpc.StatusCode.FAILED_PRECONDITION, "CHECKPOINT_NOT_FOUND", tether.CheckpointNotFound),
        (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED", tether.RequestIdReused),
        (grpc.StatusCode.OUT_OF_RANGE, "RESUME_TOKEN_EXPIRED", tether.ResumeTokenExpired),
        (grpc.StatusCode.UNAVAILABLE, "SUBSCRIBER_LAGGING", tether.SubscriberLagging),
        (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", tether.ShuttingDown),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", tether.InvalidArgument),
        (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_TASK", tether.InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", tether.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", tether.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", tether.ResourceExhausted),
        (grpc.StatusCode.INTERNAL, "INTERNAL", tether.TetherError),
    ],
)
def test_error_info_reason_picks_the_exception_class(
    code: grpc.StatusCode, reason: str, expected: type[tether.TetherError]
) -> None:
    status = rich_status(code, "it went wrong", reason, metadata={"task": "tasks/x"})
    error = _core.error_from_status(code, "it went wrong", status)
    assert type(error) is expected
    assert error.code is code
    assert error.reason == reason
    assert error.metadata == {"task": "tasks/x"}
    assert error.message == "it went wrong"
    assert str(error) == f"{reason}: it went wrong"


def test_invalid_argument_lists_the_bad_request_violations() -> None:
    status = rich_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad grace",
        "INVALID_GRACE",
        violations=(("grace.sigint", "must be at most 60s"), ("priority", "too high")),
    )
    error = _core.error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad grace", status)
    assert isinstance(error, tether.InvalidArgument)
    assert error.reason == "INVALID_GRACE"
    assert error.violations == [
        tether.FieldViolation("grace.sigint", "must be at most 60s"),
        tether.FieldViolation("priority", "too high"),
    ]


def test_reasons_of_another_domain_map_by_code_only() -> None:
    status = rich_status(grpc.StatusCode.NOT_FOUND, "no", "TASK_NOT_FOUND", domain="proxy.example")
    error = _core.error_from_status(grpc.StatusCode.NOT_FOUND, "no", status)
    assert type(error) is tether.NotFound
    assert error.reason == "TASK_NOT_FOUND"


def test_a_status_without_details_maps_by_code() -> None:
    error = _core.error_from_status(grpc.StatusCode.UNAVAILABLE, "connection refused", None)
    assert type(error) is tether.Unavailable
    assert error.reason == ""
    assert str(error) == "UNAVAILABLE: connection refused"


def _terminal_task(state: int, reason: str) -> tether.Task:
    message = task_pb2.Task(name="tasks/t", state=state)  # type: ignore[arg-type]
    message.error.reason = reason
    message.error.message = "it stopped"
    return _convert.task_from_proto(message)


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        (task_pb2.TASK_STATE_FAILED, "TASK_RAISED", tether.TaskFailed),
        (task_pb2.TASK_STATE_FAILED, "CONTROLLER_RESTARTED", tether.TaskFailed),
        (task_pb2.TASK_STATE_INTERRUPTED, "INTERRUPTED", tether.TaskInterrupted),
        (task_pb2.TASK_STATE_TIMED_OUT, "TIMED_OUT", tether.TaskTimedOut),
        (task_pb2.TASK_STATE_CANCELLED, "CANCELLED", tether.TaskCancelled),
    ],
)
def test_an_unsuccessful_task_raises_its_outcome_exception_carrying_the_task(
    state: int, reason: str, expected: type[tether.TaskOutcomeError]
) -> None:
    task = _terminal_task(state, reason)
    with pytest.raises(expected) as caught:
        _core.task_result(task)
    assert caught.value.task is task
    assert caught.value.reason == reason
    assert caught.value.code is None
    assert "tasks/t" in str(caught.value)


def test_a_succeeded_task_returns_its_result() -> None:
    message = task_pb2.Task(name="tasks/t", state=task_pb2.TASK_STATE_SUCCEEDED)
    message.result.string_value = "done"
    assert _core.task_result(_convert.task_from_proto(message)) == "done"


def test_deadline_exceeded_is_also_a_builtin_timeout_error() -> None:
    assert issubclass(tether.DeadlineExceeded, TimeoutError)


@pytest.mark.parametrize(
    "error",
    [
        tether.TaskNotFound("gone", code=grpc.StatusCode.NOT_FOUND, reason="TASK_NOT_FOUND"),
        tether.InvalidArgument("bad", violations=[tether.FieldViolation("f", "d")]),
        tether.DeadlineExceeded("slow", code=grpc.StatusCode.DEADLINE_EXCEEDED),
        tether.TaskInterrupted(_terminal_task(task_pb2.TASK_STATE_INTERRUPTED, "INTERRUPTED")),
    ],
)
def test_exceptions_survive_pickling_with_every_attribute(error: tether.TetherError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.code, copy.reason, copy.message, str(copy)) == (
        error.code,
        error.reason,
        error.message,
        str(error),
    )
    assert copy.__dict__.keys() == error.__dict__.keys()


def test_a_filter_keeps_its_own_copies_and_can_be_hashed() -> None:
    states = [tether.TaskState.RUNNING]
    task_filter = tether.TaskFilter(states=states, tasks=["demo.sleep"])
    states.append(tether.TaskState.FAILED)
    assert task_filter.states == (tether.TaskState.RUNNING,)
    assert hash(task_filter) == hash(
        tether.TaskFilter(states=[tether.TaskState.RUNNING], tasks=["demo.sleep"])
    )
