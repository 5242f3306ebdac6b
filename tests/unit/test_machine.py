"""The control core's contract, one behaviour per test (see core/machine.py's table)."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import pytest

from tether_server.core.errors import ShuttingDown, TaskAlreadyTerminal, TaskNotFound
from tether_server.core.machine import ControlCore
from tether_server.core.messages import (
    CancelTimers,
    Dispatch,
    EngineLost,
    EngineReady,
    EngineRegistered,
    EventKind,
    Instruction,
    InterruptRequested,
    KillEngine,
    Outcome,
    OutcomeStatus,
    Publish,
    ResourceLimitExceeded,
    ShutdownRequested,
    SignalDelivered,
    SignalEngine,
    StartEngine,
    StartTimer,
    TaskCheckpointed,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    TaskSubmitted,
    TimerFired,
    TimerKey,
    TimerKind,
)
from tether_server.core.model import (
    TERMINAL_STATES,
    EngineState,
    ErrorReason,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    Task,
    TaskState,
)
from tether_server.core.records import LEGAL_TRANSITIONS, InvariantViolation

GRACE = GracePeriods(sigint=2.0, sigterm=3.0, sigkill=5.0)
SIGINT, SIGTERM, SIGKILL = EscalationStage.SIGINT, EscalationStage.SIGTERM, EscalationStage.SIGKILL
InstructionT = TypeVar("InstructionT")
_seq = itertools.count(1)


# --------------------------------------------------------------------------- helpers
def make_core(
    *, target_engines: int = 1, replace_lost_engines: bool = True, **kwargs: Any
) -> ControlCore:
    return ControlCore(
        target_engines=target_engines,
        replace_lost_engines=replace_lost_engines,
        default_grace=GRACE,
        **kwargs,
    )


def new_task(task_id: str = "t1", **fields: Any) -> Task:
    fields.setdefault("seq", next(_seq))
    fields.setdefault("grace", GRACE)
    return Task(id=task_id, task="demo.sleep", args={"seconds": 1}, **fields)


def submit(
    core: ControlCore, task_id: str = "t1", now: float = 0.0, **fields: Any
) -> list[Instruction]:
    return core.handle(TaskSubmitted(new_task(task_id, create_time=now, **fields), now))


def add_engine(
    core: ControlCore, engine_id: int = 0, tags: tuple[str, ...] = (), now: float = 0.0
) -> list[Instruction]:
    core.handle(EngineRegistered(engine_id, now))
    return core.handle(EngineReady(engine_id, "node1", 1000 + engine_id, frozenset(tags), now))


def start_running(
    core: ControlCore, task_id: str = "t1", engine_id: int = 0, **fields: Any
) -> Task:
    """Submit ``task_id`` onto a fresh idle engine."""
    add_engine(core, engine_id)
    submit(core, task_id, **fields)
    assert core.tasks[task_id].engine_id == engine_id
    return core.tasks[task_id]


def interrupt(
    core: ControlCore,
    task_id: str = "t1",
    now: float = 1.0,
    grace: GracePeriods | None = None,
    cause: InterruptCause = InterruptCause.USER,
) -> list[Instruction]:
    return core.handle(InterruptRequested(task_id, "alice", "enough", cause, now, grace))


def finish(
    core: ControlCore,
    task_id: str = "t1",
    status: OutcomeStatus = OutcomeStatus.SUCCEEDED,
    *,
    attempt: int = 1,
    now: float = 5.0,
    **outcome: Any,
) -> list[Instruction]:
    return core.handle(TaskFinished(task_id, attempt, Outcome(status, **outcome), now))


def fire(
    core: ControlCore,
    kind: TimerKind,
    task_id: str = "t1",
    stage: EscalationStage = EscalationStage.NONE,
    *,
    attempt: int = 1,
    now: float = 10.0,
) -> list[Instruction]:
    return core.handle(TimerFired(TimerKey(kind, task_id, attempt, stage), now))


def of(kind: type[InstructionT], instructions: list[Instruction]) -> list[InstructionT]:
    return [i for i in instructions if isinstance(i, kind)]


def states(instructions: list[Instruction]) -> list[TaskState]:
    return [p.task.state for p in of(Publish, instructions)]


# --------------------------------------------------------------------------- submit and dispatch
def test_submitted_task_is_published_pending_and_queued() -> None:
    core = make_core()
    out = submit(core, now=3.0)
    (publish,) = of(Publish, out)
    assert publish.kind is EventKind.STATE_CHANGED
    assert publish.task.state is TaskState.PENDING
    assert publish.time == 3.0
    assert core.queue_length == 1
    assert not of(Dispatch, out)


def test_submitted_task_with_a_queue_timeout_starts_a_queue_timer() -> None:
    out = submit(make_core(), queue_timeout=30.0)
    assert of(StartTimer, out) == [StartTimer(TimerKey(TimerKind.QUEUE_TIMEOUT, "t1", 0), 30.0)]


def test_dispatch_runs_the_task_on_an_idle_engine_and_marks_it_busy() -> None:
    core = make_core()
    add_engine(core, 7)
    out = submit(core, now=2.0)
    assert of(Dispatch, out) == [Dispatch("t1", 1, 7)]
    assert states(out) == [TaskState.PENDING, TaskState.RUNNING]
    task, engine = core.tasks["t1"], core.engines[7]
    assert (task.attempt, task.engine_id, task.start_time) == (1, 7, 2.0)
    assert (engine.state, engine.current_task, engine.current_attempt) == (
        EngineState.BUSY,
        "t1",
        1,
    )
    assert core.queue_length == 0
    assert core.running_count == 1


def test_dispatch_starts_the_run_timeout_timer_when_the_task_has_one() -> None:
    core = make_core()
    add_engine(core)
    out = submit(core, timeout=60.0)
    assert of(StartTimer, out) == [StartTimer(TimerKey(TimerKind.TIMEOUT, "t1", 1), 60.0)]


def test_ready_engine_takes_work_that_was_queued_before_it_came() -> None:
    core = make_core()
    submit(core)
    out = add_engine(core, 3)
    assert of(Dispatch, out) == [Dispatch("t1", 1, 3)]


def test_higher_priority_runs_first() -> None:
    core = make_core()
    submit(core, "low", priority=0)
    submit(core, "high", priority=5)
    assert of(Dispatch, add_engine(core))[0].task_id == "high"


def test_equal_priorities_run_in_submission_order() -> None:
    core = make_core()
    for task_id in ("a", "b", "c"):
        submit(core, task_id)
    assert core.queued_task_ids() == ["a", "b", "c"]
    assert of(Dispatch, add_engine(core))[0].task_id == "a"


def test_task_requiring_tags_waits_for_such_an_engine_without_blocking_others() -> None:
    core = make_core()
    submit(core, "gpu-job", required_tags=("gpu",))
    submit(core, "cpu-job")
    assert [d.task_id for d in of(Dispatch, add_engine(core, 0))] == ["cpu-job"]
    assert core.queued_task_ids() == ["gpu-job"]
    assert of(Dispatch, add_engine(core, 1, tags=("gpu", "big")))[0].task_id == "gpu-job"


def test_untagged_task_prefers_an_engine_without_extra_tags() -> None:
    core = make_core()
    add_engine(core, 0, tags=("gpu",))
    add_engine(core, 1)
    assert of(Dispatch, submit(core))[0].engine_id == 1


def test_never_puts_a_second_task_on_a_busy_engine() -> None:
    core = make_core()
    add_engine(core)
    submit(core, "a")
    assert not of(Dispatch, submit(core, "b"))
    assert core.queued_task_ids() == ["b"]


def test_finished_engine_takes_the_next_queued_task() -> None:
    core = make_core()
    add_engine(core)
    submit(core, "a")
    submit(core, "b")
    assert of(Dispatch, finish(core, "a")) == [Dispatch("b", 1, 0)]


def test_no_dispatch_while_a_signal_is_in_flight() -> None:
    core = make_core()
    start_running(core, "a")
    submit(core, "b")
    interrupt(core, "a")  # SIGINT sent, not yet acknowledged
    out = finish(core, "a", OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert core.engines[0].state is EngineState.IDLE
    assert not of(Dispatch, out)
    assert of(Dispatch, core.handle(SignalDelivered(0, 6.0))) == [Dispatch("b", 1, 0)]


def test_signal_acknowledgements_never_go_below_zero() -> None:
    core = make_core()
    add_engine(core)
    core.handle(SignalDelivered(0, 1.0))
    assert core.engines[0].signals_in_flight == 0


def test_queue_timeout_fails_a_pending_task_and_takes_it_off_the_queue() -> None:
    core = make_core()
    submit(core, queue_timeout=30.0)
    out = fire(core, TimerKind.QUEUE_TIMEOUT, attempt=0, now=30.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.FAILED
    assert task.error is not None and task.error.reason is ErrorReason.QUEUE_TIMEOUT
    assert task.end_time == 30.0
    assert core.queue_length == 0
    assert of(CancelTimers, out) == [CancelTimers("t1")]


def test_queue_timeout_of_a_task_that_already_started_is_ignored() -> None:
    core = make_core()
    start_running(core, queue_timeout=30.0)
    assert fire(core, TimerKind.QUEUE_TIMEOUT, attempt=0) == []
    assert core.tasks["t1"].state is TaskState.RUNNING


def test_submitting_the_same_id_twice_is_a_programming_error() -> None:
    core = make_core()
    submit(core)
    with pytest.raises(ValueError):
        submit(core)


def test_submission_during_shutdown_is_refused() -> None:
    core = make_core()
    core.handle(ShutdownRequested(1.0))
    with pytest.raises(ShuttingDown):
        submit(core)
    assert core.tasks == {}


# --------------------------------------------------------------------------- interrupt requests
def test_interrupt_of_pending_task_cancels_it_without_touching_engines() -> None:
    core = make_core()
    submit(core, grace=GRACE)
    out = interrupt(core, now=4.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.CANCELLED
    assert task.error is not None and task.error.reason is ErrorReason.CANCELLED
    assert task.interrupt is not None
    assert task.interrupt.final_stage is EscalationStage.DEQUEUED
    assert (task.interrupt.requested_by, task.interrupt.reason) == ("alice", "enough")
    assert task.end_time == 4.0
    assert core.queue_length == 0
    assert [type(i) for i in out] == [Publish, CancelTimers]


def test_interrupt_of_an_unknown_task_raises_task_not_found() -> None:
    with pytest.raises(TaskNotFound) as raised:
        interrupt(make_core(), "nope")
    assert raised.value.metadata == {"name": "tasks/nope"}


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (OutcomeStatus.SUCCEEDED, TaskState.SUCCEEDED),
        (OutcomeStatus.FAILED, TaskState.FAILED),
    ],
)
def test_interrupt_of_a_finished_task_raises_already_terminal_before_any_change(
    status: OutcomeStatus, state: TaskState
) -> None:
    core = make_core()
    start_running(core)
    finish(core, status=status)
    revision = core.next_revision
    with pytest.raises(TaskAlreadyTerminal) as raised:
        interrupt(core)
    assert raised.value.metadata == {"name": "tasks/t1", "state": f"TASK_STATE_{state.name}"}
    assert core.next_revision == revision
    assert core.tasks["t1"].interrupt is None


def test_interrupt_of_a_timed_out_task_raises_already_terminal() -> None:
    core = make_core()
    start_running(core, timeout=1.0)
    fire(core, TimerKind.TIMEOUT)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert core.tasks["t1"].state is TaskState.TIMED_OUT
    with pytest.raises(TaskAlreadyTerminal):
        interrupt(core)


def test_interrupt_is_a_no_op_while_interrupting() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    assert interrupt(core, now=2.0) == []
    assert core.engines[0].signals_in_flight == 1


@pytest.mark.parametrize("state", [TaskState.INTERRUPTED, TaskState.CANCELLED])
def test_interrupt_is_a_no_op_once_interrupted_or_cancelled(state: TaskState) -> None:
    core = make_core()
    if state is TaskState.CANCELLED:
        submit(core)
        interrupt(core)
    else:
        start_running(core)
        interrupt(core)
        finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert core.tasks["t1"].state is state
    assert interrupt(core, now=9.0) == []


def test_interrupt_of_a_running_task_sends_sigint_and_starts_its_deadline() -> None:
    # Sent at once, even if the attempt may not have begun on its engine yet: the engine
    # holds a signal for an attempt that has not begun (runtime.attempts).
    core = make_core()
    start_running(core)
    out = interrupt(core, now=1.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTING
    assert task.interrupt is not None and task.interrupt.stage is SIGINT
    assert task.interrupt.request_time == 1.0
    assert task.interrupt.cause is InterruptCause.USER
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "t1", 1)]
    assert of(StartTimer, out) == [StartTimer(TimerKey(TimerKind.ESCALATE, "t1", 1, SIGINT), 2.0)]
    (publish,) = of(Publish, out)
    assert publish.kind is EventKind.STATE_CHANGED
    assert publish.task.interrupt is not None and publish.task.interrupt.stage is SIGINT
    assert core.engines[0].signals_in_flight == 1


def test_interrupt_grace_override_sets_the_deadlines() -> None:
    core = make_core()
    start_running(core)
    custom = GracePeriods(sigint=0.5, sigterm=0.25, sigkill=1.0)
    out = interrupt(core, grace=custom)
    assert of(StartTimer, out)[0].delay == 0.5
    assert core.tasks["t1"].interrupt is not None
    assert core.tasks["t1"].interrupt.grace == custom


# --------------------------------------------------------------------------- escalation
def test_escalation_goes_sigint_sigterm_sigkill_with_each_grace() -> None:
    core = make_core()
    start_running(core)
    assert of(SignalEngine, interrupt(core))[0].signal == "SIGINT"

    out = fire(core, TimerKind.ESCALATE, stage=SIGINT, now=3.0)
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGTERM", "t1", 1)]
    assert of(StartTimer, out) == [StartTimer(TimerKey(TimerKind.ESCALATE, "t1", 1, SIGTERM), 3.0)]
    assert [p.kind for p in of(Publish, out)] == [EventKind.UPDATED]
    assert core.tasks["t1"].interrupt is not None
    assert core.tasks["t1"].interrupt.stage is SIGTERM

    out = fire(core, TimerKind.ESCALATE, stage=SIGTERM, now=6.0)
    assert of(KillEngine, out)[0].engine_id == 0
    assert of(StartTimer, out) == [StartTimer(TimerKey(TimerKind.ESCALATE, "t1", 1, SIGKILL), 5.0)]
    assert core.engines[0].state is EngineState.STOPPING
    assert core.tasks["t1"].interrupt.stage is SIGKILL
    assert core.tasks["t1"].state is TaskState.INTERRUPTING


def test_killed_engine_confirmed_lost_ends_the_task_interrupted_at_sigkill() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    fire(core, TimerKind.ESCALATE, stage=SIGTERM)
    out = core.handle(EngineLost(0, 12.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTED
    assert task.interrupt is not None and task.interrupt.final_stage is SIGKILL
    assert task.error is not None and task.error.reason is ErrorReason.INTERRUPTED
    assert of(StartEngine, out) == [StartEngine(replaces=0)]


def test_sigkill_deadline_without_confirmed_death_treats_the_engine_as_lost() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    fire(core, TimerKind.ESCALATE, stage=SIGTERM)
    out = fire(core, TimerKind.ESCALATE, stage=SIGKILL, now=20.0)
    assert core.engines[0].state is EngineState.LOST
    assert core.tasks["t1"].state is TaskState.INTERRUPTED
    assert of(StartEngine, out) == [StartEngine(replaces=0)]


def test_deadline_of_a_stage_already_left_behind_is_ignored() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    assert fire(core, TimerKind.ESCALATE, stage=SIGINT, now=11.0) == []
    assert fire(core, TimerKind.ESCALATE, stage=SIGKILL, now=11.0) == []


def test_escalation_deadline_after_the_task_ended_is_ignored() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert fire(core, TimerKind.ESCALATE, stage=SIGINT) == []
    assert core.engines[0].state is EngineState.IDLE


# --------------------------------------------------------------------------- finishing
def test_success_stores_the_result_and_frees_the_engine() -> None:
    core = make_core()
    start_running(core)
    out = finish(core, value={"answer": 42}, now=7.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.SUCCEEDED
    assert (task.result, task.error, task.end_time) == ({"answer": 42}, None, 7.0)
    assert of(CancelTimers, out) == [CancelTimers("t1")]
    engine = core.engines[0]
    assert (engine.state, engine.current_task, engine.tasks_done) == (EngineState.IDLE, None, 1)


def test_failure_records_the_raised_error() -> None:
    core = make_core()
    start_running(core)
    finish(
        core,
        status=OutcomeStatus.FAILED,
        error_type="ValueError",
        error_message="bad",
        traceback="Traceback...",
    )
    error = core.tasks["t1"].error
    assert core.tasks["t1"].state is TaskState.FAILED
    assert error is not None
    assert (error.reason, error.type, error.message, error.traceback) == (
        ErrorReason.TASK_RAISED,
        "ValueError",
        "bad",
        "Traceback...",
    )


def test_finished_result_wins_over_a_pending_interrupt() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    finish(core, value=1)
    task = core.tasks["t1"]
    assert task.state is TaskState.SUCCEEDED
    assert task.result == 1
    assert task.interrupt is not None
    assert task.interrupt.final_stage is EscalationStage.NONE


def test_interrupted_outcome_after_an_interrupt_ends_interrupted_at_the_stage_that_worked() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGTERM, error_type="TaskInterrupted")
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTED
    assert task.interrupt is not None and task.interrupt.final_stage is SIGTERM
    assert task.error is not None
    assert (task.error.reason, task.error.type) == (ErrorReason.INTERRUPTED, "TaskInterrupted")


def test_keyboard_interrupt_nobody_asked_for_fails_the_task() -> None:
    core = make_core()
    start_running(core)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT, error_type="KeyboardInterrupt")
    task = core.tasks["t1"]
    assert task.state is TaskState.FAILED
    assert task.error is not None
    assert (task.error.reason, task.error.type) == (ErrorReason.TASK_RAISED, "KeyboardInterrupt")


def test_outcome_output_replaces_the_streamed_output_within_the_limit() -> None:
    core = make_core(max_output_chars=5)
    start_running(core)
    core.handle(TaskOutput("t1", 1, "ab", 1.0))
    finish(core, output="0123456789")
    task = core.tasks["t1"]
    assert (task.output, task.output_truncated) == ("01234", True)


def test_outcome_output_truncated_flag_is_kept() -> None:
    core = make_core()
    start_running(core)
    finish(core, output="abc", output_truncated=True)
    assert core.tasks["t1"].output_truncated is True


def test_resources_not_reclaimed_recycle_the_engine() -> None:
    core = make_core()
    start_running(core)
    submit(core, "next")
    out = finish(core, resources={"reclaimed": False, "rss_after_bytes": 10})
    assert of(KillEngine, out) == [KillEngine(0, "resources not reclaimed")]
    assert core.engines[0].state is EngineState.STOPPING
    assert not of(Dispatch, out)
    (end,) = of(Publish, out)
    assert end.task.resources is not None and end.task.resources.engine_recycled is True
    assert end.task.resources.rss_after_bytes == 10


def test_reclaimed_resources_keep_the_engine_and_ignore_unknown_fields() -> None:
    core = make_core()
    start_running(core)
    finish(core, resources={"reclaimed": True, "leftover_children": 0, "new_metric": 3})
    resources = core.tasks["t1"].resources
    assert resources is not None and resources.engine_recycled is False
    assert core.engines[0].state is EngineState.IDLE


def test_finish_while_the_engine_is_being_killed_keeps_it_stopping() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    fire(core, TimerKind.ESCALATE, stage=SIGTERM)
    out = finish(
        core, status=OutcomeStatus.INTERRUPTED, stage=SIGTERM, resources={"reclaimed": False}
    )
    assert core.tasks["t1"].state is TaskState.INTERRUPTED
    assert core.engines[0].state is EngineState.STOPPING
    assert core.engines[0].current_task is None
    assert not of(KillEngine, out)


def test_finished_report_of_a_stale_attempt_is_ignored() -> None:
    core = make_core()
    start_running(core)
    assert finish(core, attempt=2) == []
    assert core.tasks["t1"].state is TaskState.RUNNING


# --------------------------------------------------------------------------- timeouts and limits
def test_run_timeout_interrupts_and_ends_timed_out() -> None:
    core = make_core()
    start_running(core, timeout=5.0)
    out = fire(core, TimerKind.TIMEOUT, now=5.5)
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTING
    assert task.interrupt is not None
    assert (task.interrupt.cause, task.interrupt.requested_by) == (InterruptCause.TIMEOUT, "system")
    assert task.interrupt.reason == "timeout after 5s"
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "t1", 1)]
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    ended = core.tasks["t1"]
    assert ended.state is TaskState.TIMED_OUT
    assert ended.error is not None and ended.error.reason is ErrorReason.TIMED_OUT


def test_run_timeout_of_a_task_already_interrupting_is_ignored() -> None:
    core = make_core()
    start_running(core, timeout=5.0)
    interrupt(core)
    assert fire(core, TimerKind.TIMEOUT) == []
    assert core.tasks["t1"].interrupt is not None
    assert core.tasks["t1"].interrupt.cause is InterruptCause.USER


def test_timed_out_task_killed_with_its_engine_ends_timed_out() -> None:
    core = make_core()
    start_running(core, timeout=5.0)
    fire(core, TimerKind.TIMEOUT)
    core.handle(EngineLost(0, 11.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.TIMED_OUT
    assert task.interrupt is not None and task.interrupt.final_stage is SIGKILL


def test_resource_limit_interrupts_with_cause_resource_limit() -> None:
    core = make_core()
    start_running(core)
    out = core.handle(ResourceLimitExceeded(0, "t1", 1, "rss 9 GiB over 8 GiB", 2.0))
    task = core.tasks["t1"]
    assert task.interrupt is not None
    assert (task.interrupt.cause, task.interrupt.requested_by, task.interrupt.reason) == (
        InterruptCause.RESOURCE_LIMIT,
        "system",
        "rss 9 GiB over 8 GiB",
    )
    assert of(SignalEngine, out)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert task.state is TaskState.INTERRUPTED
    assert task.error is not None and task.error.reason is ErrorReason.RESOURCE_LIMIT


def test_resource_limit_report_for_another_engine_is_ignored() -> None:
    core = make_core()
    start_running(core)
    assert core.handle(ResourceLimitExceeded(5, "t1", 1, "x", 2.0)) == []


# --------------------------------------------------------------------------- lost engines
def test_engine_lost_under_running_task_fails_it_with_engine_lost_and_starts_a_replacement() -> (
    None
):
    core = make_core()
    start_running(core)
    out = core.handle(EngineLost(0, 3.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.FAILED
    assert task.error is not None and task.error.reason is ErrorReason.ENGINE_LOST
    assert of(CancelTimers, out) == [CancelTimers("t1")]
    assert of(StartEngine, out) == [StartEngine(replaces=0)]
    assert core.engines[0].state is EngineState.LOST
    assert core.engines[0].current_task is None


def test_engine_lost_during_an_interrupt_ends_interrupted_at_sigkill() -> None:
    core = make_core()
    start_running(core)
    interrupt(core)
    core.handle(EngineLost(0, 3.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTED
    assert task.interrupt is not None and task.interrupt.final_stage is SIGKILL


def test_engine_lost_is_idempotent() -> None:
    core = make_core()
    start_running(core)
    core.handle(EngineLost(0, 3.0))
    assert core.handle(EngineLost(0, 4.0)) == []
    assert core.handle(EngineLost(99, 4.0)) == []


def test_replacements_never_exceed_the_target_pool_size() -> None:
    core = make_core(target_engines=2)
    for engine_id in (0, 1, 2):  # one more than the target (attached mode, say)
        add_engine(core, engine_id)
    assert not of(StartEngine, core.handle(EngineLost(0, 1.0)))
    assert of(StartEngine, core.handle(EngineLost(1, 1.0))) == [StartEngine(replaces=1)]
    assert of(StartEngine, core.handle(EngineLost(2, 1.0))) == [StartEngine(replaces=2)]
    assert core.requested_engine_starts == 2


def test_an_engine_being_killed_still_counts_until_it_is_lost() -> None:
    core = make_core(target_engines=2)
    start_running(core, "a", 0)
    start_running(core, "b", 1)
    interrupt(core, "a")
    fire(core, TimerKind.ESCALATE, "a", SIGINT)
    fire(core, TimerKind.ESCALATE, "a", SIGTERM)  # engine 0 is STOPPING
    assert of(StartEngine, core.handle(EngineLost(1, 1.0))) == [StartEngine(replaces=1)]
    assert of(StartEngine, core.handle(EngineLost(0, 1.0))) == [StartEngine(replaces=0)]
    assert core.requested_engine_starts == 2


def test_registration_consumes_a_requested_start() -> None:
    core = make_core(target_engines=1)
    add_engine(core, 0)
    assert of(StartEngine, core.handle(EngineLost(0, 1.0))) == [StartEngine(replaces=0)]
    core.handle(EngineRegistered(5, 2.0))
    assert core.requested_engine_starts == 0
    assert of(StartEngine, core.handle(EngineLost(5, 3.0))) == [StartEngine(replaces=5)]


def test_no_replacement_when_replacement_is_disabled() -> None:
    core = make_core(replace_lost_engines=False)
    start_running(core)
    assert not of(StartEngine, core.handle(EngineLost(0, 3.0)))


def test_registered_engine_is_starting_until_ready() -> None:
    core = make_core()
    submit(core)
    assert core.handle(EngineRegistered(4, 1.0)) == []
    assert core.engines[4].state is EngineState.STARTING
    assert core.engines[4].register_time == 1.0


# --------------------------------------------------------------------------- progress, output
def test_progress_is_published_without_the_output() -> None:
    core = make_core()
    start_running(core)
    core.handle(TaskOutput("t1", 1, "hello", 1.0))
    (publish,) = of(Publish, core.handle(TaskProgressed("t1", 1, 0.25, "token 1", 2.0)))
    assert publish.kind is EventKind.PROGRESS
    assert (publish.task.progress_fraction, publish.task.progress_message) == (0.25, "token 1")
    assert publish.task.output == ""


def test_progress_fraction_is_kept_within_zero_and_one() -> None:
    core = make_core()
    start_running(core)
    core.handle(TaskProgressed("t1", 1, 7.0, "", 1.0))
    assert core.tasks["t1"].progress_fraction == 1.0
    core.handle(TaskProgressed("t1", 1, float("nan"), "", 1.0))
    assert core.tasks["t1"].progress_fraction == 1.0


def test_output_chunks_are_appended_and_published_as_chunks() -> None:
    core = make_core()
    start_running(core)
    core.handle(TaskOutput("t1", 1, "Hello, ", 1.0))
    (publish,) = of(Publish, core.handle(TaskOutput("t1", 1, "world", 2.0)))
    assert (publish.kind, publish.chunk, publish.task.output) == (EventKind.OUTPUT, "world", "")
    assert core.tasks["t1"].output == "Hello, world"


def test_output_beyond_the_limit_is_cut_then_dropped() -> None:
    core = make_core(max_output_chars=4)
    start_running(core)
    (publish,) = of(Publish, core.handle(TaskOutput("t1", 1, "abcdef", 1.0)))
    assert (publish.chunk, publish.task.output_truncated) == ("abcd", True)
    assert core.handle(TaskOutput("t1", 1, "more", 2.0)) == []
    assert core.tasks["t1"].output == "abcd"


def test_checkpoint_marks_the_task_and_publishes_an_update() -> None:
    core = make_core()
    start_running(core)
    (publish,) = of(Publish, core.handle(TaskCheckpointed("t1", 1, 1.0)))
    assert publish.kind is EventKind.UPDATED
    assert publish.task.has_checkpoint is True


def test_reports_for_a_stale_attempt_or_a_pending_task_are_ignored() -> None:
    core = make_core()
    submit(core)
    assert core.handle(TaskProgressed("t1", 0, 0.5, "", 1.0)) == []
    assert core.handle(TaskOutput("t1", 1, "x", 1.0)) == []
    assert core.handle(TaskCheckpointed("unknown", 1, 1.0)) == []


# --------------------------------------------------------------------------- shutdown
def test_shutdown_interrupts_running_tasks_and_keeps_pending_ones() -> None:
    core = make_core()
    start_running(core, "running")
    submit(core, "waiting")
    out = core.handle(ShutdownRequested(2.0))
    running = core.tasks["running"]
    assert running.state is TaskState.INTERRUPTING
    assert running.interrupt is not None and running.interrupt.cause is InterruptCause.SHUTDOWN
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "running", 1)]
    assert core.tasks["waiting"].state is TaskState.PENDING
    finish(core, "running", OutcomeStatus.INTERRUPTED, stage=SIGINT)
    ended = core.tasks["running"]
    assert ended.state is TaskState.INTERRUPTED
    assert ended.error is not None and ended.error.reason is ErrorReason.SHUTDOWN


def test_no_dispatch_and_no_replacement_after_shutdown() -> None:
    core = make_core()
    start_running(core, "a")
    submit(core, "b")
    core.handle(ShutdownRequested(2.0))
    finish(core, "a", OutcomeStatus.INTERRUPTED, stage=SIGINT)
    assert not of(Dispatch, core.handle(SignalDelivered(0, 3.0)))
    assert not of(StartEngine, core.handle(EngineLost(0, 4.0)))
    assert core.tasks["b"].state is TaskState.PENDING


# --------------------------------------------------------------------------- restore
def _stored(task_id: str, state: TaskState, seq: int, revision: int, **fields: Any) -> Task:
    return new_task(task_id, state=state, seq=seq, revision=revision, **fields)


def test_restore_requeues_pending_tasks_in_their_old_order() -> None:
    core = make_core()
    core.restore(
        [
            _stored("late", TaskState.PENDING, 9, 4),
            _stored("urgent", TaskState.PENDING, 10, 5, priority=3),
            _stored("early", TaskState.PENDING, 2, 3),
        ],
        now=100.0,
    )
    assert core.queued_task_ids() == ["urgent", "early", "late"]


def test_restore_fails_running_and_interrupting_tasks_with_controller_restarted() -> None:
    core = make_core()
    out = core.restore(
        [
            _stored("r", TaskState.RUNNING, 1, 10, attempt=1, engine_id=0),
            _stored("i", TaskState.INTERRUPTING, 2, 11, attempt=1, engine_id=1),
        ],
        now=100.0,
    )
    for task_id in ("r", "i"):
        task = core.tasks[task_id]
        assert task.state is TaskState.FAILED
        assert task.error is not None and task.error.reason is ErrorReason.CONTROLLER_RESTARTED
        assert task.end_time == 100.0
    assert [(p.kind, p.task.id) for p in of(Publish, out)] == [
        (EventKind.STATE_CHANGED, "r"),
        (EventKind.STATE_CHANGED, "i"),
    ]


def test_restore_leaves_terminal_tasks_unchanged() -> None:
    core = make_core()
    done = _stored("done", TaskState.SUCCEEDED, 1, 7, result=3)
    assert core.restore([done], now=100.0) == []
    assert core.tasks["done"] is done
    assert (done.state, done.revision, done.result) == (TaskState.SUCCEEDED, 7, 3)


def test_restore_continues_revisions_above_the_highest_restored_one() -> None:
    core = make_core()
    out = core.restore(
        [_stored("a", TaskState.SUCCEEDED, 1, 40), _stored("b", TaskState.RUNNING, 2, 12)], 0.0
    )
    assert of(Publish, out)[0].revision == 41
    assert core.next_revision == 42


def test_restore_restarts_queue_timers_with_the_time_left() -> None:
    core = make_core()
    out = core.restore(
        [
            _stored("a", TaskState.PENDING, 1, 1, create_time=90.0, queue_timeout=30.0),
            _stored("b", TaskState.PENDING, 2, 2, create_time=0.0, queue_timeout=30.0),
        ],
        now=100.0,
    )
    assert [t.delay for t in of(StartTimer, out)] == [20.0, 0.0]


def test_restore_is_refused_on_a_core_that_already_has_tasks() -> None:
    core = make_core()
    submit(core)
    with pytest.raises(ValueError):
        core.restore([], 0.0)


def test_restored_pending_tasks_run_when_engines_come() -> None:
    core = make_core()
    core.restore([_stored("a", TaskState.PENDING, 1, 1)], now=0.0)
    assert of(Dispatch, add_engine(core)) == [Dispatch("a", 1, 0)]


# --------------------------------------------------------------------------- events and invariants
def test_first_revision_is_where_numbering_starts() -> None:
    core = make_core(first_revision=500)
    assert of(Publish, submit(core))[0].revision == 500
    assert core.next_revision == 501


def test_revisions_strictly_increase_and_are_stamped_on_the_task() -> None:
    core = make_core()
    out = [*add_engine(core), *submit(core, now=1.0)]
    out += core.handle(TaskProgressed("t1", 1, 0.5, "", 3.0))
    out += interrupt(core, now=4.0)
    out += finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT, now=5.0)
    revisions = [p.revision for p in of(Publish, out)]
    assert revisions == sorted(set(revisions)) == list(range(1, len(revisions) + 1))
    task = core.tasks["t1"]
    assert (task.revision, task.update_time) == (revisions[-1], 5.0)


def test_snapshots_are_copies_unaffected_by_later_changes() -> None:
    core = make_core()
    start_running(core, labels={"team": "a"})
    (published,) = of(Publish, interrupt(core))
    snapshot = published.task
    fire(core, TimerKind.ESCALATE, stage=SIGINT)
    core.tasks["t1"].labels["team"] = "b"
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGTERM, resources={"reclaimed": True})
    assert snapshot.state is TaskState.INTERRUPTING
    assert snapshot.interrupt is not None and snapshot.interrupt.stage is SIGINT
    assert snapshot.interrupt.final_stage is EscalationStage.NONE
    assert snapshot.labels == {"team": "a"}
    assert snapshot.error is None and snapshot.resources is None
    assert snapshot is not core.tasks["t1"]


def test_only_terminal_snapshots_carry_the_output() -> None:
    core = make_core()
    start_running(core)
    core.handle(TaskOutput("t1", 1, "partial", 1.0))
    (update,) = of(Publish, core.handle(TaskCheckpointed("t1", 1, 2.0)))
    (end,) = of(Publish, finish(core))
    assert update.task.output == ""
    assert end.task.output == "partial"
    assert core.tasks["t1"].output == "partial"


def test_cancel_timers_comes_only_with_terminal_transitions() -> None:
    core = make_core()
    out = [*add_engine(core), *submit(core, timeout=9.0, queue_timeout=9.0)]
    out += interrupt(core)
    out += fire(core, TimerKind.ESCALATE, stage=SIGINT)
    assert not of(CancelTimers, out)
    assert of(CancelTimers, finish(core, status=OutcomeStatus.INTERRUPTED)) == [CancelTimers("t1")]


def test_terminal_states_have_no_legal_exit() -> None:
    for state in TERMINAL_STATES:
        assert LEGAL_TRANSITIONS[state] == frozenset()
    assert set(LEGAL_TRANSITIONS) == set(TaskState)


def test_late_events_never_change_a_terminal_task() -> None:
    core = make_core()
    start_running(core, timeout=1.0)
    finish(core, value="done")
    revision = core.tasks["t1"].revision
    late: list[Instruction] = []
    late += finish(core, status=OutcomeStatus.FAILED)
    late += fire(core, TimerKind.TIMEOUT)
    late += fire(core, TimerKind.ESCALATE, stage=SIGINT)
    late += core.handle(TaskOutput("t1", 1, "x", 9.0))
    late += core.handle(EngineLost(0, 9.0))
    assert not of(Publish, late)
    task = core.tasks["t1"]
    assert (task.state, task.result, task.revision) == (TaskState.SUCCEEDED, "done", revision)


def test_a_signal_to_an_engine_running_something_else_is_refused() -> None:
    core = make_core()
    start_running(core)
    task = core.tasks["t1"]
    task.attempt = 2  # the engine still runs attempt 1
    with pytest.raises(InvariantViolation):
        core._pool.signal(core.engines[0], task, SIGINT)


def test_a_failed_engine_start_lets_a_later_loss_ask_for_a_replacement_again() -> None:
    from tether_server.core.messages import EngineLost, EngineStartFailed, StartEngine

    core = ControlCore(target_engines=1, replace_lost_engines=True, default_grace=GracePeriods())
    core.handle(EngineRegistered(0, 0.0))
    core.handle(EngineReady(0, "h", 1, frozenset(), 0.0))
    first = core.handle(EngineLost(0, 1.0))
    assert [i for i in first if isinstance(i, StartEngine)]
    core.handle(EngineStartFailed(2.0))
    assert core.requested_engine_starts == 0
