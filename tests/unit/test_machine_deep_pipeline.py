"""Deep pipelines in the control core: short tasks queued several behind a running one
(core/pipeline.py ``room``, core/pace.py), without I/O."""

from __future__ import annotations

from tether_server.core.machine import ControlCore
from tether_server.core.messages import (
    Dispatch,
    EngineLost,
    OutcomeStatus,
    TaskProgressed,
    TaskSubmitted,
    Withdraw,
    Withdrawn,
)
from tether_server.core.model import ErrorReason, TaskState
from tether_server.core.pace import MIN_RUNS, SHORT_SECONDS, WINDOW, Pace

from .test_machine import add_engine, finish, interrupt, make_core, new_task, of, submit

FAST = 0.001


def taught(depth: int = 4, engines: int = 1) -> ControlCore:
    """A core whose engines are idle and which knows ``demo.sleep`` (every test task) as short."""
    core = make_core(pipeline_depth=depth, target_engines=engines)
    for engine_id in range(engines):
        add_engine(core, engine_id)
    for n in range(MIN_RUNS):
        submit(core, f"teach{n}")
        finish(core, f"teach{n}", seconds=FAST)
    assert core._pace.short("demo.sleep")
    return core


def submit_long(core: ControlCore, task_id: str) -> None:
    """Submit a task of a function the core has never seen finish (not short)."""
    task = new_task(task_id)
    task.task = "demo.count"
    core.handle(TaskSubmitted(task, 0.0))


def queue_of(core: ControlCore, engine_id: int = 0) -> list[str]:
    return [q.task_id for q in core._pool.queue_of(core.engines[engine_id])]


# --------------------------------------------------------------------------- pace
def test_a_function_is_short_after_enough_short_runs_and_long_after_one_slow_one() -> None:
    pace = Pace()
    assert not pace.short("f")  # never seen
    for _ in range(MIN_RUNS - 1):
        pace.record("f", FAST)
    assert not pace.short("f")
    pace.record("f", FAST)
    assert pace.short("f")
    pace.record("f", SHORT_SECONDS)
    assert not pace.short("f")
    for _ in range(WINDOW - 1):
        pace.record("f", FAST)
    assert not pace.short("f")  # the slow run is still in the window
    pace.record("f", FAST)
    assert pace.short("f")
    assert not pace.short("g")


# --------------------------------------------------------------------------- room
def test_short_tasks_are_queued_up_to_the_depth_and_the_rest_wait() -> None:
    core = taught(depth=4)
    out: list[Dispatch] = []
    for n in range(6):
        out += of(Dispatch, submit(core, f"t{n}"))
    assert [d.task_id for d in out] == ["t0", "t1", "t2", "t3"]  # one runs, three queued
    assert core.engines[0].current_task == "t0"
    assert queue_of(core) == ["t1", "t2", "t3"]
    assert (core.engines[0].queued_task, core.engines[0].queued_count) == ("t1", 3)
    assert core.queued_task_ids() == ["t4", "t5"]
    assert all(core.tasks[t].state is TaskState.PENDING for t in ("t1", "t2", "t3"))


def test_an_unknown_function_gets_one_place_behind_the_running_task() -> None:
    core = make_core(pipeline_depth=8)
    add_engine(core, 0)
    for n in range(4):
        submit(core, f"t{n}")
    assert queue_of(core) == ["t1"]
    assert core.queued_task_ids() == ["t2", "t3"]


def test_the_endings_of_several_free_as_many_places_in_one_dispatch() -> None:
    core = taught(depth=4)
    for n in range(8):
        submit(core, f"t{n}")
    out = finish(core, "t0", seconds=FAST)
    assert of(Dispatch, out) == [Dispatch("t4", 1, 0)]
    assert core.engines[0].current_task == "t1"
    assert queue_of(core) == ["t2", "t3", "t4"]


def test_a_slow_run_ends_deep_queueing_for_its_function() -> None:
    core = taught(depth=4)
    for n in range(6):
        submit(core, f"t{n}")
    finish(core, "t0", seconds=1.0)  # a slow one: not short any more
    assert not core._pace.short("demo.sleep")
    for name in ("t1", "t2", "t3"):  # what was queued still runs in turn
        finish(core, name, seconds=FAST)
    assert queue_of(core) == ["t5"]  # but only one place behind t4 now


def test_short_tasks_do_not_overtake_a_waiting_long_one_into_deep_places() -> None:
    core = taught(depth=4)
    submit(core, "t0")
    submit(core, "t1")  # the place right behind t0
    submit_long(core, "long")  # unknown: not short
    submit(core, "t2")
    assert queue_of(core) == ["t1"]
    assert core.queued_task_ids() == ["long", "t2"]


def test_a_long_task_is_never_queued_deep_and_nothing_is_queued_deep_behind_it() -> None:
    core = taught(depth=4)
    submit_long(core, "long")
    submit(core, "t1")
    submit(core, "t2")
    assert queue_of(core) == ["t1"]  # behind a long running task: one place only
    assert core.queued_task_ids() == ["t2"]


# --------------------------------------------------------------------------- turns and reports
def test_each_ending_gives_the_next_queued_its_turn_in_order() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    for n in range(3):
        finish(core, f"t{n}", seconds=FAST, now=5.0 + n)
        assert core.engines[0].current_task == f"t{n + 1}"
        assert core.tasks[f"t{n + 1}"].state is TaskState.RUNNING
    finish(core, "t3", seconds=FAST)
    assert core.engines[0].current_task is None and not queue_of(core)


def test_endings_of_deeper_attempts_that_arrive_first_wait_for_their_turn() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    # The early reports of a batch came on IOPub before the running one's reply.
    assert finish(core, "t2", seconds=FAST, now=5.0) == []
    assert finish(core, "t1", seconds=FAST, now=5.1) == []
    finish(core, "t0", seconds=FAST, now=5.2)
    assert [core.tasks[t].state for t in ("t0", "t1", "t2")] == [TaskState.SUCCEEDED] * 3
    assert core.engines[0].current_task == "t3"


def test_a_not_started_answer_of_a_deeper_attempt_sends_only_it_back() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    finish(core, "t2", OutcomeStatus.NOT_STARTED)
    assert queue_of(core) == ["t1", "t3", "t2"]  # back in the queue, then queued again
    assert core.tasks["t2"].attempt == 2


# --------------------------------------------------------------------------- withdrawals
def test_an_interrupt_of_the_running_task_withdraws_everything_queued_behind_it() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    out = interrupt(core, "t0")
    assert of(Withdraw, out) == [Withdraw(0, "t1", 1), Withdraw(0, "t2", 1), Withdraw(0, "t3", 1)]
    core.handle(Withdrawn(0, "t1", 1, True, 1.1))
    core.handle(Withdrawn(0, "t2", 1, True, 1.2))
    core.handle(Withdrawn(0, "t3", 1, True, 1.3))
    assert not queue_of(core)
    assert core.queued_task_ids() == ["t1", "t2", "t3"]  # in their old order


def test_interrupting_a_deeper_queued_task_cancels_it_alone() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    out = interrupt(core, "t2")
    assert of(Withdraw, out) == [Withdraw(0, "t2", 1)]
    core.handle(Withdrawn(0, "t2", 1, True, 1.1))
    assert core.tasks["t2"].state is TaskState.CANCELLED
    assert queue_of(core) == ["t1", "t3"]
    assert core.tasks["t0"].state is TaskState.RUNNING


def test_a_withdrawal_that_came_too_late_means_everything_before_it_began() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    interrupt(core, "t0")
    core.handle(Withdrawn(0, "t2", 1, False, 1.1))  # t2 began: so did t1
    slots = core._pool.queue_of(core.engines[0])
    assert [(q.task_id, q.began) for q in slots] == [("t1", True), ("t2", True), ("t3", False)]


def test_an_idle_engine_takes_the_last_queued_task_of_a_busy_one() -> None:
    core = taught(depth=4, engines=2)
    for n in range(5):  # t0 on engine 0, t1 on engine 1, the rest queued
        submit(core, f"t{n}")
    for n in range(5, 8):
        submit(core, f"t{n}")
    behind_0 = queue_of(core, 0)
    finish(core, "t1", seconds=FAST)  # engine 1 runs its queue down...
    for name in queue_of(core, 1):
        finish(core, name, seconds=FAST)
    out = finish(core, core.engines[1].current_task or "", seconds=FAST)
    assert of(Withdraw, out) == [Withdraw(0, behind_0[-1], 1)]  # ...then takes engine 0's last


# --------------------------------------------------------------------------- losses
def test_an_engine_lost_with_a_deep_queue_ends_what_began_and_requeues_the_rest() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    core.handle(TaskProgressed("t2", 1, 0.5, "began", 1.0))  # t2 began, so t1 did
    core.handle(EngineLost(0, 2.0))
    ended = {t: core.tasks[t] for t in ("t0", "t1", "t2")}
    assert {t.state for t in ended.values()} == {TaskState.FAILED}
    assert {t.error.reason for t in ended.values() if t.error} == {ErrorReason.ENGINE_LOST}
    assert core.tasks["t3"].state is TaskState.PENDING
    assert core.queued_task_ids() == ["t3"]


def test_a_higher_priority_task_withdraws_the_lowest_queued_one() -> None:
    core = taught(depth=4)
    for n in range(4):
        submit(core, f"t{n}")
    out = submit(core, "urgent", priority=5)
    assert of(Withdraw, out) == [Withdraw(0, "t3", 1)]
    core.handle(Withdrawn(0, "t3", 1, True, 1.1))
    assert queue_of(core) == ["t1", "t2", "urgent"]
    assert core.queued_task_ids() == ["t3"]
