"""Pipelined dispatch in the control core (core/pipeline.py), without I/O."""

from __future__ import annotations

from typing import Any

from tether_server.core.machine import ControlCore
from tether_server.core.messages import (
    Dispatch,
    EngineLost,
    InterruptRequested,
    KillEngine,
    OutcomeStatus,
    Publish,
    ShutdownRequested,
    SignalDelivered,
    SignalEngine,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    Withdraw,
    Withdrawn,
)
from tether_server.core.model import (
    EngineState,
    ErrorReason,
    EscalationStage,
    InterruptCause,
    TaskState,
)

from .test_machine import add_engine, finish, interrupt, make_core, of, states, submit


def pipelined(**kwargs: Any) -> ControlCore:
    """A core with one engine (0) holding a running t1 and a queued t2."""
    core = make_core(pipeline_depth=2, **kwargs)
    add_engine(core, 0)
    submit(core, "t1")
    return core


def test_a_second_task_is_queued_behind_the_running_one_and_stays_pending() -> None:
    core = pipelined()
    out = submit(core, "t2", now=1.0)
    assert of(Dispatch, out) == [Dispatch("t2", 1, 0)]
    assert states(out) == [TaskState.PENDING]  # published once, as submitted
    t2, engine = core.tasks["t2"], core.engines[0]
    assert (t2.state, t2.attempt, t2.engine_id) == (TaskState.PENDING, 1, None)
    assert (engine.current_task, engine.queued_task, engine.queued_attempt) == ("t1", "t2", 1)
    assert core.queue_length == 1  # still PENDING: it counts as waiting


def test_depth_one_queues_nothing_behind_a_running_task() -> None:
    core = make_core()
    add_engine(core, 0)
    submit(core, "t1")
    assert not of(Dispatch, submit(core, "t2"))
    assert core.queue_length == 1


def test_the_queued_task_runs_when_the_running_one_ends_and_the_next_is_queued() -> None:
    core = pipelined()
    submit(core, "t2")
    submit(core, "t3")
    out = finish(core, "t1", now=2.0)
    assert [(p.task.id, p.task.state) for p in of(Publish, out)] == [
        ("t1", TaskState.SUCCEEDED),
        ("t2", TaskState.RUNNING),
    ]
    assert of(Dispatch, out) == [Dispatch("t3", 1, 0)]  # the place behind t2 is filled
    t2 = core.tasks["t2"]
    assert (t2.engine_id, t2.start_time) == (0, 2.0)
    engine = core.engines[0]
    assert (engine.current_task, engine.queued_task) == ("t2", "t3")


def test_reports_of_the_queued_attempt_before_its_turn_are_replayed_in_order() -> None:
    core = pipelined()
    submit(core, "t2")
    # The engine ran t1 and began t2; t2's IOPub reports beat t1's reply.
    assert core.handle(TaskProgressed("t2", 1, 0.5, "half", 1.0)) == []
    assert core.handle(TaskOutput("t2", 1, "hello", 1.1)) == []
    assert core.tasks["t2"].output == ""
    out = finish(core, "t1", now=1.2)
    assert [(p.task.id, p.kind.name) for p in of(Publish, out)] == [
        ("t1", "STATE_CHANGED"),
        ("t2", "STATE_CHANGED"),
        ("t2", "PROGRESS"),
        ("t2", "OUTPUT"),
    ]
    assert core.tasks["t2"].output == "hello"
    assert core.tasks["t2"].progress_message == "half"


def test_a_queued_attempt_that_finished_before_the_running_one_ends_after_it() -> None:
    core = pipelined()
    submit(core, "t2")
    early = TaskFinished("t2", 1, _ok(), 1.0)
    assert core.handle(early) == []
    out = finish(core, "t1", now=1.5)
    assert [(p.task.id, p.task.state) for p in of(Publish, out)] == [
        ("t1", TaskState.SUCCEEDED),
        ("t2", TaskState.RUNNING),
        ("t2", TaskState.SUCCEEDED),
    ]
    assert core.engines[0].state is EngineState.IDLE


def test_interrupting_a_queued_task_withdraws_it_and_cancels_it_on_the_answer() -> None:
    core = pipelined()
    submit(core, "t2")
    out = interrupt(core, "t2")
    assert of(Withdraw, out) == [Withdraw(0, "t2", 1)]
    assert not of(SignalEngine, out)  # the running task is not touched
    assert core.tasks["t2"].state is TaskState.PENDING
    assert core.withdrawal_pending("t2")
    out = core.handle(Withdrawn(0, "t2", 1, True, 1.1))
    t2 = core.tasks["t2"]
    assert (t2.state, t2.interrupt.final_stage) == (TaskState.CANCELLED, EscalationStage.DEQUEUED)
    assert t2.error.reason is ErrorReason.CANCELLED
    assert core.tasks["t1"].state is TaskState.RUNNING
    assert core.engines[0].queued_task is None
    # Its "not started" answer from the engine, later, changes nothing.
    assert core.handle(_not_started("t2", 1.2)) == []


def test_a_queued_task_that_had_begun_is_interrupted_at_its_turn() -> None:
    core = pipelined()
    submit(core, "t2")
    interrupt(core, "t2")
    assert core.handle(Withdrawn(0, "t2", 1, False, 1.1)) == []
    out = finish(core, "t1", now=1.2)
    assert [p.task.state for p in of(Publish, out) if p.task.id == "t2"] == [
        TaskState.RUNNING,
        TaskState.INTERRUPTING,
    ]
    # At once: it is t2's turn on the engine, which holds the signal if t2 has not begun.
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "t2", 1)]


def test_interrupting_the_running_task_withdraws_the_queued_one_back_to_the_queue() -> None:
    core = pipelined()
    submit(core, "t2")
    out = interrupt(core, "t1")
    assert of(Withdraw, out) == [Withdraw(0, "t2", 1)]
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "t1", 1)]
    core.handle(Withdrawn(0, "t2", 1, True, 1.1))
    assert core.tasks["t2"].state is TaskState.PENDING
    assert core.queued_task_ids() == ["t2"]
    # Nothing is queued behind a task that is being interrupted.
    assert core.engines[0].queued_task is None
    core.handle(SignalDelivered(0, 1.2))
    out = finish(core, "t1", OutcomeStatus.INTERRUPTED, now=2.0, stage=EscalationStage.SIGINT)
    assert of(Dispatch, out) == [Dispatch("t2", 2, 0)]  # the next dispatch counts


def test_a_higher_priority_task_takes_the_place_of_a_queued_lower_one() -> None:
    core = pipelined()
    submit(core, "low", priority=0)
    out = submit(core, "urgent", priority=10)
    assert of(Withdraw, out) == [Withdraw(0, "low", 1)]
    out = core.handle(Withdrawn(0, "low", 1, True, 1.0))
    assert of(Dispatch, out) == [Dispatch("urgent", 1, 0)]
    assert core.queued_task_ids() == ["low"]


def test_an_equal_priority_task_does_not_withdraw_a_queued_one() -> None:
    core = pipelined()
    submit(core, "first")
    assert not of(Withdraw, submit(core, "second"))


def test_a_recycled_engine_gives_its_queued_task_back() -> None:
    core = pipelined()
    submit(core, "t2")
    resources = {"reclaimed": False, "summary": "held 1 GB"}
    out = finish(core, "t1", now=2.0, resources=resources)
    assert of(KillEngine, out)
    assert core.tasks["t2"].state is TaskState.PENDING  # not promoted onto a dying engine
    out = core.handle(_not_started("t2", 2.1))
    assert core.queued_task_ids() == ["t2"]
    assert core.engines[0].queued_task is None
    assert not of(Dispatch, out)  # the engine is STOPPING


def test_a_lost_engine_puts_its_queued_task_back_unless_it_had_begun() -> None:
    core = pipelined(target_engines=2)
    submit(core, "t2")
    core.handle(EngineLost(0, 3.0))
    assert core.tasks["t1"].state is TaskState.FAILED
    assert core.tasks["t2"].state is TaskState.PENDING
    assert core.queued_task_ids() == ["t2"]

    core = pipelined(target_engines=2)
    submit(core, "t2")
    core.handle(TaskOutput("t2", 1, "hi", 2.0))  # it had begun: it died with the engine
    core.handle(EngineLost(0, 3.0))
    t2 = core.tasks["t2"]
    assert (t2.state, t2.error.reason) == (TaskState.FAILED, ErrorReason.ENGINE_LOST)


def test_shutdown_withdraws_queued_tasks_and_keeps_them_pending() -> None:
    core = pipelined()
    submit(core, "t2")
    out = core.handle(ShutdownRequested(1.0))
    assert of(Withdraw, out) == [Withdraw(0, "t2", 1)]
    core.handle(Withdrawn(0, "t2", 1, True, 1.1))
    assert core.tasks["t2"].state is TaskState.PENDING
    assert core.queued_task_ids() == ["t2"]


def test_a_queued_task_that_had_begun_at_shutdown_is_interrupted_at_its_turn() -> None:
    core = pipelined()
    submit(core, "t2")
    core.handle(ShutdownRequested(1.0))
    core.handle(Withdrawn(0, "t2", 1, False, 1.1))
    finish(core, "t1", OutcomeStatus.INTERRUPTED, now=1.2, stage=EscalationStage.SIGINT)
    t2 = core.tasks["t2"]
    assert t2.state is TaskState.INTERRUPTING
    assert t2.interrupt.cause is InterruptCause.SHUTDOWN


def test_a_late_answer_for_a_withdrawal_that_began_starts_the_task_when_the_engine_is_idle() -> (
    None
):
    core = pipelined()
    submit(core, "t2")
    interrupt(core, "t1")  # withdraws t2
    finish(core, "t1", OutcomeStatus.INTERRUPTED, now=1.5, stage=EscalationStage.SIGINT)
    assert core.tasks["t2"].state is TaskState.PENDING  # waiting for the answer
    out = core.handle(Withdrawn(0, "t2", 1, False, 1.6))
    assert [p.task.state for p in of(Publish, out)] == [TaskState.RUNNING]


def _ok() -> Any:
    from tether_server.core.messages import Outcome

    return Outcome(OutcomeStatus.SUCCEEDED, value=1)


def _not_started(task_id: str, now: float) -> TaskFinished:
    from tether_server.core.messages import Outcome

    return TaskFinished(task_id, 1, Outcome(OutcomeStatus.NOT_STARTED), now)


def test_an_interrupt_request_event_type_is_reused_for_queued_cancels() -> None:
    core = pipelined()
    submit(core, "t2")
    request = InterruptRequested("t2", "bob", "changed my mind", InterruptCause.USER, 1.0)
    core.handle(request)
    core.handle(Withdrawn(0, "t2", 1, True, 1.1))
    record = core.tasks["t2"].interrupt
    assert (record.requested_by, record.reason) == ("bob", "changed my mind")


def test_an_idle_engine_takes_what_waits_behind_a_busy_one() -> None:
    core = pipelined(target_engines=2)
    submit(core, "t2")
    assert core.engines[0].queued_task == "t2"
    out = add_engine(core, 1, now=2.0)  # a second engine with nothing to do
    assert of(Withdraw, out) == [Withdraw(0, "t2", 1)]
    out = core.handle(Withdrawn(0, "t2", 1, True, 2.1))
    assert of(Dispatch, out) == [Dispatch("t2", 2, 1)]
    assert core.tasks["t2"].state is TaskState.RUNNING
    assert core.tasks["t1"].state is TaskState.RUNNING  # the long one was not touched
