"""The engine runtime's registry and TaskContext, without a cluster or signals."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tether_server.runtime import TaskContext, UnknownTaskError, get, task, validate_args
from tether_server.runtime.jsonvalue import MAX_CHECKPOINT_BYTES, to_json_value
from tether_server.runtime.registry import bind_args, load_modules, names, unregister

load_modules(["tether_server.tasks.demo"])


def typed(
    ctx: TaskContext,
    count: int,
    ratio: float,
    label: str = "x",
    flag: bool = False,
    items: list[str] | None = None,
    options: dict[str, Any] | None = None,
    anything: Any = None,
) -> None:
    """A task with every simple annotation the registry checks."""


def open_ended(first: int, **rest: Any) -> None:
    """A task that takes extra keyword arguments."""


_TEST_TASKS: dict[str, Callable[..., Any]] = {"unit.typed": typed, "unit.open": open_ended}


@pytest.fixture(autouse=True, scope="module")
def _registered_test_tasks() -> Iterator[None]:
    """Register this module's throwaway tasks only while its tests run."""
    for name, function in _TEST_TASKS.items():
        task(name)(function)
    yield
    for name in _TEST_TASKS:
        unregister(name)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def kinds(self) -> list[str]:
        return [m["tether"][0] for m in self.messages]

    def payloads(self, kind: str) -> list[Any]:
        return [m["tether"][3] for m in self.messages if m["tether"][0] == kind]


# --------------------------------------------------------------------------- registry
def test_demo_tasks_are_registered_on_import() -> None:
    assert {"demo.echo", "demo.sleep", "demo.spin", "demo.fail", "demo.stubborn"} <= set(names())
    assert {"demo.c_call", "demo.count", "demo.leak", "demo.spawn"} <= set(names())
    assert get("demo.sleep").takes_context
    assert not get("demo.echo").takes_context
    assert get("demo.cooperative").cooperative


def test_validate_args_accepts_arguments_that_bind() -> None:
    validate_args("demo.sleep", {"seconds": 1.5})
    validate_args("unit.typed", {"count": 3, "ratio": 1, "items": ["a"], "options": {"k": 1}})


def test_validate_args_names_a_missing_argument() -> None:
    with pytest.raises(TypeError, match=r"demo\.sleep: missing required argument 'seconds'"):
        validate_args("demo.sleep", {})


def test_validate_args_names_an_unexpected_argument_and_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"unexpected argument 'secs' \(accepted: seconds\)"):
        validate_args("demo.sleep", {"seconds": 1, "secs": 1})


def test_validate_args_refuses_wrong_json_types() -> None:
    with pytest.raises(TypeError, match=r"'seconds' must be a number, got string 'soon'"):
        validate_args("demo.sleep", {"seconds": "soon"})
    with pytest.raises(TypeError, match=r"'label' must be a string, got number 3"):
        validate_args("unit.typed", {"count": 1, "ratio": 1.0, "label": 3})
    with pytest.raises(TypeError, match=r"'flag' must be a boolean"):
        validate_args("unit.typed", {"count": 1, "ratio": 1.0, "flag": 1})
    with pytest.raises(TypeError, match=r"'items' must be a list or null"):
        validate_args("unit.typed", {"count": 1, "ratio": 1.0, "items": "a"})


def test_validate_args_reports_every_problem_at_once() -> None:
    with pytest.raises(TypeError) as caught:
        validate_args("unit.typed", {"ratio": "x", "extra": 1})
    message = str(caught.value)
    assert "missing required argument 'count'" in message
    assert "'ratio' must be a number" in message
    assert "unexpected argument 'extra'" in message


def test_integral_floats_from_protobuf_struct_bind_to_int_parameters_as_ints() -> None:
    bound = bind_args(get("unit.typed"), {"count": 3.0, "ratio": 2})
    assert bound == {"count": 3, "ratio": 2.0}
    assert type(bound["count"]) is int
    assert type(bound["ratio"]) is float


def test_fractional_floats_and_booleans_do_not_bind_to_int_parameters() -> None:
    with pytest.raises(TypeError, match=r"'count' must be an integer, got number 2\.5"):
        validate_args("unit.typed", {"count": 2.5, "ratio": 1})
    with pytest.raises(TypeError, match=r"'count' must be an integer, got boolean True"):
        validate_args("unit.typed", {"count": True, "ratio": 1})


def test_null_binds_to_optional_parameters() -> None:
    validate_args("unit.typed", {"count": 1, "ratio": 1, "items": None, "options": None})


def test_ctx_is_reserved_for_the_task_context() -> None:
    with pytest.raises(TypeError, match="'ctx' is reserved"):
        validate_args("demo.sleep", {"seconds": 1, "ctx": 1})


def test_var_keyword_tasks_accept_extra_arguments() -> None:
    assert bind_args(get("unit.open"), {"first": 1.0, "second": "x"}) == {"first": 1, "second": "x"}


def test_arguments_must_be_a_json_object() -> None:
    with pytest.raises(TypeError, match="arguments must be a JSON object"):
        validate_args("demo.echo", [1, 2])  # type: ignore[arg-type]


def test_unknown_task_raises_a_key_error_listing_the_known_ones() -> None:
    with pytest.raises(UnknownTaskError) as caught:
        validate_args("demo.nope", {})
    assert isinstance(caught.value, KeyError)
    assert "unknown task 'demo.nope'" in str(caught.value)
    assert "demo.echo" in str(caught.value)


def test_a_name_cannot_be_taken_by_a_second_function() -> None:
    def other() -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        task("demo.echo")(other)


def test_registering_the_same_function_again_is_allowed() -> None:
    task("unit.open")(open_ended)
    assert get("unit.open").function is open_ended


def test_task_names_must_be_dotted_identifiers() -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        task("has space")


def test_load_modules_names_the_module_that_failed() -> None:
    with pytest.raises(ImportError, match="cannot import task module 'no_such_module_xyz'"):
        load_modules(["no_such_module_xyz"])


# --------------------------------------------------------------------------- context
def test_progress_is_published_with_task_id_and_attempt_and_clamped() -> None:
    sink = Recorder()
    ctx = TaskContext("t1", 2, sink=sink)
    ctx.progress(0.5, "half")
    ctx.progress(1.2)
    ctx.progress(-1)
    assert sink.messages[0] == {"tether": ["progress", "t1", 2, [0.5, "half"]]}
    assert sink.payloads("progress")[1:] == [[1.0, ""], [0.0, ""]]


def test_progress_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        TaskContext().progress(math.nan)


def test_emit_publishes_each_chunk_and_keeps_the_output() -> None:
    sink = Recorder()
    ctx = TaskContext("t1", 0, sink=sink)
    ctx.emit("hello ")
    ctx.emit("")
    ctx.emit("world")
    assert sink.payloads("output") == ["hello ", "world"]
    assert ctx.output == "hello world"
    assert not ctx.output_truncated


def test_output_keeps_the_most_recent_characters_when_over_the_limit() -> None:
    ctx = TaskContext(max_output_chars=10)
    for i in range(10):
        ctx.emit(f"{i}abc")
    assert ctx.output == "".join(f"{i}abc" for i in range(10))[-10:]
    assert ctx.output_truncated


def test_a_chunk_longer_than_the_limit_keeps_its_tail() -> None:
    sink = Recorder()
    ctx = TaskContext(max_output_chars=4, sink=sink)
    ctx.emit("abcdefgh")
    assert ctx.output == "efgh"
    assert sink.payloads("output") == ["efgh"]
    assert ctx.output_truncated


def test_emit_needs_a_string() -> None:
    with pytest.raises(TypeError, match="emit needs a str"):
        TaskContext().emit(b"bytes")  # type: ignore[arg-type]


def test_checkpoint_publishes_json_state() -> None:
    sink = Recorder()
    ctx = TaskContext("t1", 0, sink=sink)
    ctx.checkpoint({"done": 3, "ids": (1, 2)})
    assert sink.messages == [{"tether": ["checkpoint", "t1", 0, {"done": 3, "ids": [1, 2]}]}]


def test_checkpoint_refuses_non_json_state() -> None:
    with pytest.raises(ValueError, match=r"checkpoint\['s'\]: set is not JSON"):
        TaskContext().checkpoint({"s": {1, 2}})


def test_checkpoint_refuses_state_over_one_mebibyte() -> None:
    with pytest.raises(ValueError, match="limit is 1048576"):
        TaskContext().checkpoint("x" * MAX_CHECKPOINT_BYTES)


def test_resume_state_is_handed_to_the_task() -> None:
    assert TaskContext("t", 1, {"done": 2}).resume_state == {"done": 2}


def test_on_interrupt_returns_the_callback_and_hooks_run_last_registered_first() -> None:
    ctx = TaskContext()
    order: list[str] = []

    @ctx.on_interrupt
    def first() -> None:
        order.append("first")

    ctx.on_interrupt(lambda: order.append("second"))
    for hook in ctx._take_hooks():
        hook()
    assert order == ["second", "first"]
    assert first is not None


def test_check_raises_keyboard_interrupt_once_interrupted() -> None:
    ctx = TaskContext()
    ctx.check()
    assert not ctx.interrupted
    ctx._signals.sigints += 1
    assert ctx.interrupted
    with pytest.raises(KeyboardInterrupt):
        ctx.check()


def test_a_failing_sink_never_breaks_the_task() -> None:
    def broken(message: dict[str, Any]) -> None:
        raise OSError("iopub gone")

    ctx = TaskContext(sink=broken)
    ctx.emit("x")
    ctx.progress(0.1)
    assert ctx.publish_failures == 2
    assert ctx.output == "x"


def test_reports_after_the_attempt_ended_are_dropped() -> None:
    sink = Recorder()
    ctx = TaskContext(sink=sink)
    ctx._close()
    ctx.emit("late")
    ctx.progress(0.5)
    assert sink.messages == []


def test_uninterruptible_outside_signals_is_a_plain_block() -> None:
    ctx = TaskContext()
    with ctx.uninterruptible(), ctx.uninterruptible():
        pass


# --------------------------------------------------------------------------- JSON
def test_json_values_are_normalised() -> None:
    assert to_json_value({"a": (1, 2.5, None, True)}) == {"a": [1, 2.5, None, True]}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1: 2}, "key 1 is not a string"),
        ([math.inf], r"value\[0\]: inf is not a finite number"),
        (object(), "object is not JSON"),
        ({"b": b"x"}, r"value\['b'\]: bytes is not JSON"),
    ],
)
def test_non_json_values_are_refused_with_their_path(value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        to_json_value(value)
