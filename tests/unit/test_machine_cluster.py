"""The control core when the whole cluster goes (ClusterLost) and when tasks leave memory."""

from __future__ import annotations

from tests.unit.test_machine import (
    GRACE,
    add_engine,
    finish,
    interrupt,
    make_core,
    start_running,
    submit,
)
from tether_server.core.messages import (
    ClusterLost,
    Dispatch,
    EngineLost,
    Outcome,
    OutcomeStatus,
    Publish,
    StartEngine,
    TaskFinished,
)
from tether_server.core.model import ErrorReason, EscalationStage, TaskState


def test_cluster_loss_fails_running_tasks_with_cluster_lost_and_keeps_pending_ones() -> None:
    core = make_core(target_engines=1)
    start_running(core, "t1")
    submit(core, "t2")
    out = core.handle(ClusterLost("controller process exited", 2.0))
    t1, t2 = core.tasks["t1"], core.tasks["t2"]
    assert t1.state is TaskState.FAILED
    assert t1.error is not None and t1.error.reason is ErrorReason.CLUSTER_LOST
    assert "controller process exited" in t1.error.message
    assert t2.state is TaskState.PENDING
    assert core.queued_task_ids() == ["t2"]
    published = [i for i in out if isinstance(i, Publish)]
    assert [p.task.id for p in published] == ["t1"]
    assert not any(isinstance(i, (Dispatch, StartEngine)) for i in out)


def test_cluster_loss_forgets_every_engine_so_the_next_hub_may_reuse_their_ids() -> None:
    core = make_core(target_engines=2)
    add_engine(core, 0)
    add_engine(core, 1)
    core.handle(ClusterLost("gone", 1.0))
    assert core.engines == {}
    assert core.requested_engine_starts == 0
    submit(core, "t1")
    out = add_engine(core, 0, now=3.0)  # engine 0 of the new hub
    assert any(isinstance(i, Dispatch) and i.engine_id == 0 for i in out)
    assert core.tasks["t1"].state is TaskState.RUNNING


def test_interrupting_task_on_a_lost_cluster_ends_interrupted_at_sigkill() -> None:
    core = make_core()
    start_running(core, "t1")
    interrupt(core, "t1")
    core.handle(ClusterLost("frozen", 2.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTED
    assert task.interrupt is not None and task.interrupt.final_stage is EscalationStage.SIGKILL


def test_reports_from_the_old_cluster_are_ignored_after_its_loss() -> None:
    core = make_core()
    start_running(core, "t1")
    core.handle(ClusterLost("gone", 2.0))
    assert core.handle(EngineLost(0, 2.5)) == []
    late = TaskFinished("t1", 1, Outcome(OutcomeStatus.SUCCEEDED, value=1), 3.0)
    assert core.handle(late) == []
    assert core.tasks["t1"].state is TaskState.FAILED


def test_forget_drops_terminal_tasks_only() -> None:
    core = make_core()
    start_running(core, "t1")
    submit(core, "t2")
    assert not core.forget("t1")  # running
    assert not core.forget("t2")  # pending
    finish(core, "t1")
    assert core.forget("t1")
    assert "t1" not in core.tasks
    assert not core.forget("t1")
    assert core.tasks["t2"].state is TaskState.RUNNING  # the freed engine took it
    assert GRACE.sigint > 0


# --------------------------------------------------------------------------- warm spares
def test_engines_beyond_the_target_are_warm_spares_that_take_no_task() -> None:
    core = make_core(target_engines=1, spare_engines=1)
    add_engine(core, 0)
    add_engine(core, 1)
    assert [core.engines[0].spare, core.engines[1].spare] == [False, True]
    submit(core, "t1")
    submit(core, "t2")
    assert core.tasks["t1"].engine_id == 0
    assert core.tasks["t2"].state is TaskState.PENDING  # the spare does not take it


def test_a_spare_takes_a_lost_engines_place_at_once_and_a_new_spare_is_started() -> None:
    core = make_core(target_engines=1, spare_engines=1)
    start_running(core, "t1", engine_id=0)
    add_engine(core, 1)
    submit(core, "t2")
    out = core.handle(EngineLost(0, 3.0))
    assert core.tasks["t1"].error is not None
    assert core.engines[1].spare is False
    assert any(isinstance(i, Dispatch) and i.engine_id == 1 for i in out)
    assert any(isinstance(i, StartEngine) for i in out)
    assert core.tasks["t2"].state is TaskState.RUNNING
    out = add_engine(core, 2, now=4.0)
    assert core.engines[2].spare is True
    assert not any(isinstance(i, Dispatch) for i in out)


def test_a_lost_spare_is_replaced_by_a_new_spare() -> None:
    core = make_core(target_engines=1, spare_engines=1)
    add_engine(core, 0)
    add_engine(core, 1)
    out = core.handle(EngineLost(1, 2.0))
    assert any(isinstance(i, StartEngine) for i in out)
    assert core.engines[0].spare is False
    add_engine(core, 2, now=3.0)
    assert core.engines[2].spare is True


def test_without_spares_every_ready_engine_is_active() -> None:
    core = make_core(target_engines=1)
    add_engine(core, 0)
    add_engine(core, 1)
    assert not core.engines[0].spare and not core.engines[1].spare
