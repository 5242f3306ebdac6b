"""core.placement: which required tags some engine can carry, now or once started."""

from __future__ import annotations

from tether_server.core.model import Engine, EngineState, Task, TaskState
from tether_server.core.placement import feasible, unschedulable


def _engine(engine_id: int, tags: set[str], state: EngineState = EngineState.IDLE) -> Engine:
    engine = Engine(engine_id)
    engine.tags = frozenset(tags)
    engine.state = state
    return engine


def test_no_required_tags_is_always_feasible() -> None:
    assert feasible([], [], [])


def test_a_live_engine_or_an_offer_with_every_tag_makes_it_feasible() -> None:
    engines = [_engine(0, {"gpu", "gpu:0"})]
    assert feasible(["gpu:0"], engines, [])
    assert feasible(["gpu:1"], engines, [frozenset({"gpu", "gpu:1"})])
    assert not feasible(["gpu", "big"], engines, [frozenset({"big"})])


def test_a_lost_engine_does_not_count() -> None:
    assert not feasible(["gpu"], [_engine(0, {"gpu"}, EngineState.LOST)], [])


def test_unschedulable_lists_pending_tasks_no_live_engine_carries() -> None:
    fits = Task(id="a", task="demo.echo", args={}, required_tags=("gpu",))
    misses = Task(id="b", task="demo.echo", args={}, required_tags=("tpu",))
    running = Task(
        id="c", task="demo.echo", args={}, required_tags=("tpu",), state=TaskState.RUNNING
    )
    assert unschedulable([fits, misses, running], [_engine(0, {"gpu"})]) == [misses]
