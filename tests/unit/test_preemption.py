"""Priority preemption in the control core: victim choice, the ladder, the requeue."""

from __future__ import annotations

from typing import Any

from tests.unit.test_machine import (
    add_engine,
    finish,
    fire,
    interrupt,
    make_core,
    of,
    submit,
)
from tether_server.core.machine import ControlCore
from tether_server.core.messages import (
    Dispatch,
    EngineLost,
    Instruction,
    OutcomeStatus,
    SignalDelivered,
    SignalEngine,
    StartTimer,
    TimerKind,
)
from tether_server.core.model import (
    AttemptEnding,
    EscalationStage,
    InterruptCause,
    TaskState,
)

SIGINT = EscalationStage.SIGINT


def run_on(
    core: ControlCore, task_id: str, engine_id: int, *, now: float, **fields: Any
) -> list[Instruction]:
    """Submit ``task_id``, which must start on ``engine_id`` (the free one)."""
    out = submit(core, task_id, now=now, **fields)
    task = core.tasks[task_id]
    assert task.engine_id == engine_id, task
    return out


def busy_pool(core: ControlCore, *specs: dict[str, Any]) -> None:
    """One engine per spec, each running the low-priority task the spec describes."""
    for engine_id, spec in enumerate(specs):
        spec = dict(spec)
        add_engine(core, engine_id, tags=spec.pop("tags", ()))
        run_on(core, spec.pop("id"), engine_id, now=spec.pop("start", 0.0), **spec)


def ack(core: ControlCore, out: list[Instruction], now: float) -> None:
    for sig in of(SignalEngine, out):
        core.handle(SignalDelivered(sig.engine_id, now))


def test_an_urgent_task_sigints_the_preemptible_task_on_the_only_engine() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    out = submit(core, "urgent", now=1.0, priority=10)
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "low", 1)]
    low = core.tasks["low"]
    assert low.state is TaskState.INTERRUPTING and low.interrupt is not None
    assert low.interrupt.cause is InterruptCause.PREEMPTED
    assert low.interrupt.requested_by == "tasks/urgent"


def test_the_victim_is_queued_again_and_the_urgent_task_takes_its_engine() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    out = finish(core, "low", OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    assert of(Dispatch, out) == [Dispatch("urgent", 1, 0)]
    low = core.tasks["low"]
    assert low.state is TaskState.PENDING and low.attempt == 1 and low.interrupt is None
    (attempt,) = low.attempts
    assert attempt.ending is AttemptEnding.PREEMPTED and attempt.reason == "PREEMPTED"
    assert attempt.ended_by == "tasks/urgent"
    assert core.queued_task_ids() == ["low"]
    # When the urgent task is done, the victim resumes as its next attempt.
    out = finish(core, "urgent", now=2.0)
    assert of(Dispatch, out) == [Dispatch("low", 2, 0)]


def test_a_task_that_is_not_preemptible_is_never_a_victim() -> None:
    core = make_core()
    busy_pool(core, {"id": "low"})
    out = submit(core, "urgent", now=1.0, priority=10)
    assert of(SignalEngine, out) == []
    assert core.tasks["low"].state is TaskState.RUNNING


def test_equal_priority_never_preempts() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True, "priority": 5})
    assert of(SignalEngine, submit(core, "same", now=1.0, priority=5)) == []


def test_the_lowest_priority_is_chosen_first() -> None:
    core = make_core(target_engines=2)
    busy_pool(
        core,
        {"id": "p3", "preemptible": True, "priority": 3, "start": 5.0},
        {"id": "p1", "preemptible": True, "priority": 1, "start": 0.0},
    )
    out = submit(core, "urgent", now=6.0, priority=10)
    assert [s.task_id for s in of(SignalEngine, out)] == ["p1"]


def test_among_equal_priorities_the_most_recently_started_is_chosen() -> None:
    core = make_core(target_engines=2)
    busy_pool(
        core,
        {"id": "old", "preemptible": True, "start": 0.0},
        {"id": "new", "preemptible": True, "start": 5.0},
    )
    out = submit(core, "urgent", now=6.0, priority=10)
    assert [s.task_id for s in of(SignalEngine, out)] == ["new"]


def test_only_an_engine_with_the_urgent_tasks_tags_is_freed() -> None:
    core = make_core(target_engines=2)
    busy_pool(
        core,
        {"id": "cpu", "preemptible": True, "start": 5.0},
        {"id": "gpu", "preemptible": True, "start": 0.0, "tags": ("gpu",)},
    )
    out = submit(core, "urgent", now=6.0, priority=10, required_tags=("gpu",))
    assert [s.task_id for s in of(SignalEngine, out)] == ["gpu"]


def test_no_fitting_engine_means_no_preemption() -> None:
    core = make_core()
    busy_pool(core, {"id": "cpu", "preemptible": True})
    out = submit(core, "urgent", now=1.0, priority=10, required_tags=("gpu",))
    assert of(SignalEngine, out) == []


def test_one_urgent_task_preempts_at_most_one_task() -> None:
    core = make_core(target_engines=2)
    busy_pool(
        core,
        {"id": "a", "preemptible": True},
        {"id": "b", "preemptible": True},
    )
    out = submit(core, "urgent", now=1.0, priority=10)
    assert len(of(SignalEngine, out)) == 1
    # More events that run the dispatch loop do not make it take a second engine.
    ack(core, out, 1.0)
    add_engine(core, 7, tags=("other",))
    submit(core, "noise", now=1.5, required_tags=("nowhere",))
    assert [t.state for t in (core.tasks["a"], core.tasks["b"])].count(TaskState.RUNNING) == 1


def test_two_urgent_tasks_preempt_one_task_each() -> None:
    core = make_core(target_engines=2)
    busy_pool(
        core,
        {"id": "a", "preemptible": True},
        {"id": "b", "preemptible": True},
    )
    out = submit(core, "u1", now=1.0, priority=10)
    out += submit(core, "u2", now=1.0, priority=10)
    assert sorted(s.task_id for s in of(SignalEngine, out)) == ["a", "b"]


def test_a_preempted_task_runs_its_minimum_time_before_it_can_be_preempted_again() -> None:
    core = make_core(preempt_min_runtime=10.0)
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "u1", now=1.0, priority=10), 1.0)
    finish(core, "low", OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    finish(core, "u1", now=2.0)  # low resumes at t=2 (attempt 2)
    out = submit(core, "u2", now=3.0, priority=10)
    assert of(SignalEngine, out) == []
    (check,) = [t for t in of(StartTimer, out) if t.key.kind is TimerKind.PREEMPT_CHECK]
    assert check.delay == 9.0  # eligible at 2 + 10
    out = fire(core, TimerKind.PREEMPT_CHECK, "", attempt=0, now=12.0)
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "low", 2)]


def test_a_victim_that_finishes_on_its_own_first_wins_and_is_not_requeued() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    out = finish(core, "low", OutcomeStatus.SUCCEEDED, value=42, now=1.05)
    low = core.tasks["low"]
    assert low.state is TaskState.SUCCEEDED and low.result == 42
    assert low.interrupt is not None  # the record says a preemption was asked for
    assert low.attempts[-1].ending is AttemptEnding.FINAL
    assert of(Dispatch, out) == [Dispatch("urgent", 1, 0)]
    assert "low" not in core.queued_task_ids()


def test_interrupting_a_task_queued_again_after_preemption_cancels_it() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    finish(core, "low", OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    out = interrupt(core, "low", now=1.5)
    low = core.tasks["low"]
    assert low.state is TaskState.CANCELLED
    assert of(SignalEngine, out) == [] and core.queued_task_ids() == []


def test_a_user_interrupt_during_a_preemption_makes_the_ending_final() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    interrupt(core, "low", now=1.05)
    finish(core, "low", OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    low = core.tasks["low"]
    assert low.state is TaskState.INTERRUPTED
    assert low.interrupt is not None and low.interrupt.cause is InterruptCause.USER


def test_a_victim_whose_engine_dies_during_the_ladder_is_still_queued_again() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    core.handle(EngineLost(0, 4.0))
    low = core.tasks["low"]
    assert low.state is TaskState.PENDING
    assert low.attempts[-1].ending is AttemptEnding.PREEMPTED


def test_a_victim_that_ignores_sigint_is_escalated_like_any_interrupt() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "urgent", now=1.0, priority=10), 1.0)
    out = fire(core, TimerKind.ESCALATE, "low", SIGINT, now=3.0)
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGTERM", "low", 1)]


def test_a_queued_task_whose_priority_is_not_above_any_running_one_is_left_waiting() -> None:
    core = make_core()
    busy_pool(core, {"id": "low", "preemptible": True, "priority": 5})
    out: list[Instruction] = []
    for n in range(50):
        out += submit(core, f"q{n}", now=1.0, priority=5)
    assert of(SignalEngine, out) == []
    assert len(core.queued_task_ids()) == 50


# --------------------------------------------------------------------------- pipelined dispatch
def test_with_depth_two_an_urgent_task_preempts_instead_of_queueing_behind_a_running_one() -> None:
    core = make_core(target_engines=2, pipeline_depth=2)
    busy_pool(core, {"id": "a", "preemptible": True}, {"id": "b", "preemptible": True})
    out = submit(core, "urgent", now=1.0, priority=10)
    (sig,) = of(SignalEngine, out)
    assert all(e.queued_task != "urgent" for e in core.engines.values())
    assert core.queued_task_ids() == ["urgent"]  # waits for the engine it frees
    ack(core, out, 1.0)
    victim = sig.task_id
    out = finish(core, victim, OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    assert Dispatch("urgent", 1, sig.engine_id) in of(Dispatch, out)
    assert core.tasks[victim].state is TaskState.PENDING


def test_with_depth_two_a_task_queued_behind_a_preemptible_one_preempts_it() -> None:
    core = make_core(target_engines=1, pipeline_depth=2, preempt_min_runtime=10.0)
    busy_pool(core, {"id": "low", "preemptible": True})
    ack(core, submit(core, "u1", now=1.0, priority=10), 1.0)
    finish(core, "low", OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    finish(core, "u1", attempt=1, now=2.0)  # low resumes (attempt 2) at t=2
    out = submit(core, "u2", now=3.0, priority=10)  # low is too young to preempt again
    assert of(SignalEngine, out) == []
    assert core.engines[0].queued_task == "u2"  # so u2 waits behind it
    out = fire(core, TimerKind.PREEMPT_CHECK, "", attempt=0, now=12.0)
    assert of(SignalEngine, out) == [SignalEngine(0, "SIGINT", "low", 2)]


def test_with_depth_two_a_preempted_task_waits_for_a_free_engine_not_behind_a_running_one() -> None:
    core = make_core(target_engines=2, pipeline_depth=2)
    busy_pool(core, {"id": "a", "preemptible": True}, {"id": "b", "preemptible": True})
    out = submit(core, "urgent", now=1.0, priority=10)
    ack(core, out, 1.0)
    (sig,) = of(SignalEngine, out)
    finish(core, sig.task_id, OutcomeStatus.INTERRUPTED, stage=SIGINT, now=1.1)
    assert all(e.queued_task != sig.task_id for e in core.engines.values())
    assert core.queued_task_ids() == [sig.task_id]
    out = finish(core, "urgent", attempt=1, now=1.2)
    assert of(Dispatch, out) == [Dispatch(sig.task_id, 2, sig.engine_id)]
