"""The store codec turns every domain record into JSON and back without losing anything."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether_server.core.model import (
    AttemptEnding,
    Engine,
    EngineState,
    ErrorReason,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    InterruptRecord,
    ResourceReport,
    RetryPolicy,
    Task,
    TaskAttempt,
    TaskError,
    TaskState,
)
from tether_server.store.codec import (
    dataclass_from_dict,
    dataclass_to_dict,
    task_from_dict,
    task_to_dict,
)

# NaN is left out only because NaN != NaN would fail the equality check; inf is kept.
floats = st.floats(allow_nan=False)
optional_floats = st.none() | floats
text = st.text(max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | floats | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
grace_periods = st.builds(GracePeriods, sigint=floats, sigterm=floats, sigkill=floats)
interrupt_records = st.builds(
    InterruptRecord,
    requested_by=text,
    reason=text,
    request_time=floats,
    cause=st.sampled_from(InterruptCause),
    grace=grace_periods,
    stage=st.sampled_from(EscalationStage),
    final_stage=st.sampled_from(EscalationStage),
)
task_errors = st.builds(
    TaskError, reason=st.sampled_from(ErrorReason), message=text, type=text, traceback=text
)
resource_reports = st.builds(
    ResourceReport,
    rss_before_bytes=st.integers(min_value=0),
    rss_after_bytes=st.integers(min_value=0),
    gpu_allocated_before_bytes=st.integers(min_value=0),
    gpu_allocated_after_bytes=st.integers(min_value=0),
    gpu_reserved_after_bytes=st.integers(min_value=0),
    leftover_children=st.integers(min_value=0),
    reclaimed=st.booleans(),
    engine_recycled=st.booleans(),
    summary=text,
)

retry_policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(min_value=1),
    retry_on=st.frozensets(st.sampled_from(ErrorReason)),
    initial_backoff=floats,
    max_backoff=floats,
    multiplier=floats,
    jitter=floats,
)
task_attempts = st.builds(
    TaskAttempt,
    attempt=st.integers(min_value=1),
    engine_id=st.none() | st.integers(min_value=0),
    start_time=floats,
    end_time=optional_floats,
    ending=st.sampled_from(AttemptEnding),
    reason=text,
    message=text,
    ended_by=text,
)

TASK_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": text,
    "task": text,
    "args": st.dictionaries(text, json_values, max_size=4),
    "owner": text,
    "labels": st.dictionaries(text, text, max_size=4),
    "priority": st.integers(),
    "state": st.sampled_from(TaskState),
    "engine_id": st.none() | st.integers(min_value=0),
    "attempt": st.integers(min_value=0),
    "create_time": floats,
    "start_time": optional_floats,
    "end_time": optional_floats,
    "update_time": floats,
    "timeout": optional_floats,
    "queue_timeout": optional_floats,
    "grace": grace_periods,
    "progress_fraction": floats,
    "progress_message": text,
    "output": text,
    "output_truncated": st.booleans(),
    "interrupt": st.none() | interrupt_records,
    "result": json_values,
    "error": st.none() | task_errors,
    "revision": st.integers(min_value=0),
    "resume_from": text,
    "has_checkpoint": st.booleans(),
    "resources": st.none() | resource_reports,
    "required_tags": st.lists(text, max_size=4).map(tuple),
    "retry": st.none() | retry_policies,
    "preemptible": st.booleans(),
    "attempts": st.lists(task_attempts, max_size=3),
    "seq": st.integers(min_value=0),
}
tasks = st.builds(Task, **TASK_FIELDS)

engines = st.builds(
    Engine,
    id=st.integers(min_value=0),
    state=st.sampled_from(EngineState),
    host=text,
    pid=st.integers(min_value=0),
    tags=st.frozensets(text, max_size=5),
    current_task=st.none() | text,
    current_attempt=st.integers(min_value=0),
    tasks_done=st.integers(min_value=0),
    register_time=floats,
    last_seen=floats,
    signals_in_flight=st.integers(min_value=0),
)


def through_json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def test_the_task_strategy_sets_every_field_of_task() -> None:
    assert set(TASK_FIELDS) == {f.name for f in dataclasses.fields(Task)}


@given(tasks)
def test_any_task_survives_a_json_round_trip(task: Task) -> None:
    assert task_from_dict(through_json(task_to_dict(task))) == task


@given(tasks)
def test_an_encoded_task_is_already_plain_json(task: Task) -> None:
    encoded = task_to_dict(task)
    # Equal after a JSON round trip means: no tuples, enums, sets or dataclasses left inside.
    assert through_json(encoded) == encoded


@given(engines)
def test_any_engine_with_frozenset_tags_survives_a_json_round_trip(engine: Engine) -> None:
    assert dataclass_from_dict(Engine, through_json(dataclass_to_dict(engine))) == engine


@given(st.frozensets(text, max_size=6))
def test_equal_frozensets_encode_to_the_same_text(tags: frozenset[str]) -> None:
    shuffled = frozenset(sorted(tags, reverse=True))
    first = json.dumps(dataclass_to_dict(Engine(id=0, tags=tags)))
    assert json.dumps(dataclass_to_dict(Engine(id=0, tags=shuffled))) == first


def test_enums_are_written_by_name() -> None:
    task = Task(
        id="t1",
        task="demo.sleep",
        args={},
        state=TaskState.INTERRUPTED,
        error=TaskError(reason=ErrorReason.INTERRUPTED),
        interrupt=InterruptRecord(
            requested_by="alice",
            reason="stop",
            request_time=1.0,
            cause=InterruptCause.USER,
            grace=GracePeriods(),
            final_stage=EscalationStage.SIGKILL,
        ),
    )
    encoded = task_to_dict(task)
    assert encoded["state"] == "INTERRUPTED"
    assert encoded["error"]["reason"] == "INTERRUPTED"
    assert encoded["interrupt"]["cause"] == "USER"
    assert encoded["interrupt"]["final_stage"] == "SIGKILL"


def test_fields_missing_from_stored_data_take_their_defaults() -> None:
    assert task_from_dict({"id": "t1", "task": "demo.sleep", "args": {"n": 1}}) == Task(
        id="t1", task="demo.sleep", args={"n": 1}
    )


def test_stored_keys_the_model_no_longer_has_are_ignored() -> None:
    data = task_to_dict(Task(id="t1", task="demo.sleep", args={}))
    data["field_from_another_version"] = 42
    assert task_from_dict(data) == Task(id="t1", task="demo.sleep", args={})


def test_an_integer_in_a_float_field_decodes_as_a_float() -> None:
    task = task_from_dict({"id": "t1", "task": "x", "args": {}, "create_time": 3})
    assert isinstance(task.create_time, float)


def test_a_missing_required_field_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Task: missing required field\(s\) \['args'\]"):
        task_from_dict({"id": "t1", "task": "demo.sleep"})


def test_an_unknown_enum_name_is_rejected_with_the_field_path() -> None:
    data = task_to_dict(
        Task(
            id="t1",
            task="demo.sleep",
            args={},
            interrupt=InterruptRecord("alice", "", 0.0, InterruptCause.USER, GracePeriods()),
        )
    )
    data["interrupt"]["cause"] = "MOON_PHASE"
    with pytest.raises(ValueError, match=r"Task\.interrupt: InterruptRecord\.cause: .*MOON_PHASE"):
        task_from_dict(data)


def test_encoding_does_not_share_containers_with_the_task() -> None:
    task = Task(id="t1", task="x", args={}, labels={"a": "b"}, required_tags=("gpu",))
    encoded = task_to_dict(task)
    encoded["labels"]["a"] = "changed"
    encoded["required_tags"].append("cpu")
    assert task.labels == {"a": "b"}
    assert task.required_tags == ("gpu",)
