"""Attached mode after a restart: the core re-attaches to the old controller's work
(core/restore.py), without I/O."""

from __future__ import annotations

from typing import Any

from tether_server.core.machine import ControlCore
from tether_server.core.messages import (
    Dispatch,
    EngineLost,
    EngineReady,
    EngineRegistered,
    FoundAttempt,
    Outcome,
    OutcomeStatus,
    Publish,
    Reattached,
    SignalEngine,
    StartTimer,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    TimerKind,
)
from tether_server.core.model import (
    AttemptEnding,
    EngineState,
    ErrorReason,
    EscalationStage,
    InterruptCause,
    InterruptRecord,
    Task,
    TaskAttempt,
    TaskState,
)

from .test_machine import GRACE, interrupt, make_core, new_task, of, submit


def stored(task_id: str, state: TaskState, **fields: Any) -> Task:
    if state.active:
        fields.setdefault("attempt", 1)
        fields.setdefault("engine_id", 0)
        fields.setdefault("start_time", 10.0)
        fields.setdefault("attempts", [TaskAttempt(fields["attempt"], fields["engine_id"], 10.0)])
    return new_task(task_id, state=state, revision=fields.pop("revision", 5), **fields)


def reattaching(*tasks: Task, engines: int = 2, **kwargs: Any) -> ControlCore:
    """A restarted core in attached mode whose engines registered (setup still pending)."""
    core = make_core(target_engines=engines, replace_lost_engines=False, **kwargs)
    assert core.restore(list(tasks), now=100.0, reattach=True) == []
    for engine_id in range(engines):
        core.handle(EngineRegistered(engine_id, 100.0))
    assert core.reconciling
    return core


def found(
    task_id: str,
    attempt: int = 1,
    engine_id: int = 0,
    *,
    began: bool = True,
    submitted: float = 9.0,
    outcome: Outcome | None = None,
) -> FoundAttempt:
    return FoundAttempt(task_id, attempt, engine_id, submitted, began, outcome)


def reattached(core: ControlCore, *f: FoundAttempt, detail: str = "") -> list[Any]:
    out = core.handle(Reattached(tuple(f), detail, 101.0))
    assert not core.reconciling
    return out


def test_nothing_is_dispatched_while_the_old_work_is_not_reconciled() -> None:
    core = reattaching(stored("p", TaskState.PENDING))
    core.handle(EngineReady(1, "h", 11, frozenset(), 100.5))  # a free engine is ready
    assert not of(Dispatch, submit(core, "new", now=100.6))
    out = reattached(core)
    assert [d.task_id for d in of(Dispatch, out)] == ["p"]  # the old queue first


def test_a_task_still_running_is_adopted_on_its_engine_and_its_result_delivered() -> None:
    core = reattaching(stored("r", TaskState.RUNNING))
    out = reattached(core, found("r"))
    assert not of(Publish, out)  # nothing changed: it runs on
    task, engine = core.tasks["r"], core.engines[0]
    assert (task.state, task.attempt, task.engine_id) == (TaskState.RUNNING, 1, 0)
    assert (engine.state, engine.current_task) == (EngineState.BUSY, "r")
    core.handle(TaskProgressed("r", 1, 0.5, "half", 102.0))
    assert task.progress_message == "half"
    out = core.handle(TaskFinished("r", 1, Outcome(OutcomeStatus.SUCCEEDED, value=7), 103.0))
    assert (task.state, task.result, task.error) == (TaskState.SUCCEEDED, 7, None)
    assert engine.state is EngineState.IDLE
    # ...but its setup (queued behind the task) has not answered: it takes nothing yet.
    assert not of(Dispatch, submit(core, "next", now=104.0))
    out = core.handle(EngineReady(0, "h", 10, frozenset({"gpu"}), 105.0))
    assert of(Dispatch, out) == [Dispatch("next", 1, 0)]
    assert engine.tags == frozenset({"gpu"})


def test_reports_that_came_during_the_reconciliation_are_replayed_on_adoption() -> None:
    core = reattaching(stored("r", TaskState.RUNNING))
    core.handle(TaskOutput("r", 1, "ab", 100.2))
    core.handle(TaskOutput("r", 1, "cd", 100.3))
    out = reattached(core, found("r"))
    assert [p.chunk for p in of(Publish, out)] == ["ab", "cd"]
    assert core.tasks["r"].output == "abcd"


def test_an_engine_ready_before_the_reconciliation_adopts_the_task_without_losing_its_role() -> (
    None
):
    core = reattaching(stored("r", TaskState.RUNNING))
    core.handle(EngineReady(0, "h", 10, frozenset(), 100.5))  # the task had just ended
    reattached(core, found("r"))
    engine = core.engines[0]
    assert (engine.state, engine.current_task) == (EngineState.BUSY, "r")
    core.handle(TaskFinished("r", 1, Outcome(OutcomeStatus.SUCCEEDED), 102.0))
    assert engine.state is EngineState.IDLE


def test_a_task_that_ended_while_no_controller_listened_gets_its_ending() -> None:
    core = reattaching(
        stored("ok", TaskState.RUNNING),
        stored("bad", TaskState.RUNNING, engine_id=1),
    )
    out = reattached(
        core,
        found("ok", outcome=Outcome(OutcomeStatus.SUCCEEDED, value="v", output="text")),
        found(
            "bad",
            engine_id=1,
            outcome=Outcome(OutcomeStatus.FAILED, error_type="ValueError", error_message="no"),
        ),
    )
    ok, bad = core.tasks["ok"], core.tasks["bad"]
    assert (ok.state, ok.result, ok.output) == (TaskState.SUCCEEDED, "v", "text")
    assert bad.state is TaskState.FAILED
    assert bad.error is not None and bad.error.reason is ErrorReason.TASK_RAISED
    assert [p.task.id for p in of(Publish, out)] == ["ok", "bad"]
    assert ok.attempts[-1].ending is AttemptEnding.FINAL


def test_a_pending_task_the_old_controller_had_queued_on_an_engine_is_found_running() -> None:
    # Pipelined dispatch does not store the queued attempt: the store says PENDING, attempt 0.
    core = reattaching(stored("q", TaskState.PENDING))
    out = reattached(core, found("q", attempt=1, submitted=20.0))
    task = core.tasks["q"]
    assert (task.state, task.attempt, task.engine_id, task.start_time) == (
        TaskState.RUNNING,
        1,
        0,
        20.0,
    )
    assert [p.task.state for p in of(Publish, out)] == [TaskState.RUNNING]
    assert [(a.attempt, a.engine_id) for a in task.attempts] == [(1, 0)]
    assert not of(Dispatch, out)  # it is not sent again


def test_a_task_withdrawn_from_an_engine_runs_again_with_a_fresh_attempt_number() -> None:
    core = reattaching(stored("q", TaskState.PENDING))
    core.handle(EngineReady(1, "h", 11, frozenset(), 100.5))
    out = reattached(core, found("q", attempt=1, began=False))
    # The engine refuses attempt 1 for ever (it was withdrawn): the next one is 2.
    assert of(Dispatch, out) == [Dispatch("q", 2, 1)]


def test_a_running_task_whose_attempt_never_started_goes_back_to_the_queue() -> None:
    core = reattaching(stored("r", TaskState.RUNNING))
    out = reattached(core, found("r", began=False))
    task = core.tasks["r"]
    assert task.state is TaskState.PENDING
    assert task.attempts[-1].ending is AttemptEnding.RETRIED
    assert [p.task.state for p in of(Publish, out)] == [TaskState.PENDING]


def test_an_interrupted_task_whose_attempt_never_started_ends_as_asked() -> None:
    record = InterruptRecord("alice", "enough", 50.0, InterruptCause.USER, GRACE)
    core = reattaching(stored("i", TaskState.INTERRUPTING, interrupt=record))
    reattached(core, found("i", began=False))
    task = core.tasks["i"]
    assert task.state is TaskState.INTERRUPTED
    assert record.final_stage is EscalationStage.DEQUEUED


def test_a_running_task_nobody_knows_of_fails_with_controller_restarted_and_the_reason() -> None:
    core = reattaching(stored("r", TaskState.RUNNING), stored("p", TaskState.PENDING))
    reattached(core, detail="the hub keeps no task records (NoDB)")
    r = core.tasks["r"]
    assert r.state is TaskState.FAILED
    assert r.error is not None and r.error.reason is ErrorReason.CONTROLLER_RESTARTED
    assert "NoDB" in r.error.message
    assert core.tasks["p"].state is TaskState.PENDING


def test_an_interrupting_task_that_still_runs_starts_its_ladder_again_at_sigint() -> None:
    record = InterruptRecord("alice", "enough", 50.0, InterruptCause.USER, GRACE)
    record.stage = EscalationStage.SIGTERM
    core = reattaching(stored("i", TaskState.INTERRUPTING, interrupt=record))
    out = reattached(core, found("i"))
    assert [(s.signal, s.task_id) for s in of(SignalEngine, out)] == [("SIGINT", "i")]
    timers = [t.key for t in of(StartTimer, out)]
    assert [(k.kind, k.stage) for k in timers] == [(TimerKind.ESCALATE, EscalationStage.SIGINT)]
    assert record.stage is EscalationStage.SIGINT


def test_an_interrupt_during_the_reconciliation_waits_for_it_then_applies() -> None:
    core = reattaching(stored("r", TaskState.RUNNING), stored("q", TaskState.PENDING))
    assert interrupt(core, "r", now=100.5) == []
    assert interrupt(core, "q", now=100.5) == []
    assert core.withdrawal_pending("r") and core.withdrawal_pending("q")
    out = reattached(core, found("r"))
    assert core.tasks["r"].state is TaskState.INTERRUPTING
    assert [s.task_id for s in of(SignalEngine, out)] == ["r"]
    assert core.tasks["q"].state is TaskState.CANCELLED
    assert not core.withdrawal_pending("r")


def test_two_attempts_that_began_on_one_engine_run_in_the_order_they_were_sent() -> None:
    # The first's reply is on its way; the second began behind it.
    core = reattaching(stored("a", TaskState.RUNNING), stored("b", TaskState.PENDING), engines=1)
    reattached(core, found("b", submitted=12.0), found("a", submitted=11.0))
    engine = core.engines[0]
    assert (engine.current_task, engine.queued_task) == ("a", "b")
    out = core.handle(TaskFinished("a", 1, Outcome(OutcomeStatus.SUCCEEDED), 102.0))
    assert core.tasks["b"].state is TaskState.RUNNING  # its turn came at once
    assert [p.task.id for p in of(Publish, out)] == ["a", "b"]


def test_an_adopted_task_ends_with_its_engine() -> None:
    core = reattaching(stored("r", TaskState.RUNNING))
    reattached(core, found("r"))
    core.handle(EngineLost(0, 102.0))
    task = core.tasks["r"]
    assert task.error is not None and task.error.reason is ErrorReason.ENGINE_LOST


def test_a_task_found_on_an_engine_that_did_not_register_ends_engine_lost() -> None:
    core = reattaching(stored("r", TaskState.RUNNING, engine_id=5))
    reattached(core, found("r", engine_id=5))
    task = core.tasks["r"]
    assert task.state is TaskState.FAILED
    assert task.error is not None and task.error.reason is ErrorReason.ENGINE_LOST


def test_the_queue_timeout_of_a_restored_task_starts_after_the_reconciliation() -> None:
    core = reattaching(stored("p", TaskState.PENDING, create_time=90.0, queue_timeout=30.0))
    out = reattached(core)
    assert [(t.key.kind, t.delay) for t in of(StartTimer, out)] == [(TimerKind.QUEUE_TIMEOUT, 19.0)]


def test_the_timeout_of_an_adopted_task_counts_from_its_start() -> None:
    core = reattaching(stored("r", TaskState.RUNNING, start_time=90.0, timeout=30.0))
    out = reattached(core, found("r"))
    assert [(t.key.kind, t.delay) for t in of(StartTimer, out)] == [(TimerKind.TIMEOUT, 19.0)]


def test_found_attempts_older_than_the_stored_one_are_ignored() -> None:
    # Attempt 1 failed and was retried before the restart; attempt 2 runs.
    core = reattaching(stored("r", TaskState.RUNNING, attempt=2))
    reattached(
        core,
        found("r", attempt=1, outcome=Outcome(OutcomeStatus.FAILED)),
        found("r", attempt=2),
    )
    task = core.tasks["r"]
    assert (task.state, task.attempt) == (TaskState.RUNNING, 2)
