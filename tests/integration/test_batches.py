"""Short tasks sent several to a request (``--pipeline-depth`` 8, the default), on a real
one-engine server.

Each test builds the same moment: a blocker of another function runs while three
runs of the function under test wait; their ends teach the server that the function
is short (``core/pace.py``). At the third one's end the engine has room for more
than one, so the next three waiting tasks, S5, L and S6, leave in one request
(``dispatch.EngineDriver.flush``). S5 is short, L is long, S6 waits behind L. What
must hold: S5's ending does not wait for L's (the runtime reports it early), an
interrupt of L reaches only L, and the engine's death ends only what had begun.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .conftest import wait_for
from .helpers import (
    engines,
    get,
    seconds,
    submit,
    usable_engines,
    wait_in_c_call,
    wait_state,
    wait_terminal,
)
from .http_helpers import scrape, serve_http, value

REQUESTS = "tether_task_requests_total"
ATTEMPTS = "tether_task_request_attempts_total"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    yield from serve_http(tmp_path_factory.mktemp("batches") / "data", engines=1)


@pytest.fixture(scope="module")
def server(served: tuple[ServerProcess, str]) -> ServerProcess:
    return served[0]


@pytest.fixture(scope="module")
def base(served: tuple[ServerProcess, str]) -> str:
    return served[1]


def sent_together(base: str) -> float:
    """Attempts that travelled in a request with another one, so far."""
    samples = scrape(base)
    return value(samples, ATTEMPTS) - value(samples, REQUESTS)


def a_batch(tasks: Any, function: str, short: dict[str, Any], long: dict[str, Any]) -> list[str]:
    """The moment of the module docstring; the names of S5, L and S6."""
    blocker = submit(tasks, "demo.count", args={"n": 10, "interval": 0.1})
    wait_state(tasks, blocker.name, {tpb.TASK_STATE_RUNNING})
    names = [submit(tasks, function, args=short).name for _ in range(4)]  # three teach, S4
    names += [submit(tasks, function, args=args).name for args in (short, long, short)]
    assert get_state(tasks, blocker.name) == tpb.TASK_STATE_RUNNING, "the blocker ended early"
    return names[4:]


def get_state(tasks: Any, name: str) -> int:
    return int(get(tasks, name).state)


def test_an_ending_in_a_batch_does_not_wait_for_the_long_task_after_it(
    tasks: Any, base: str
) -> None:
    before = sent_together(base)
    s5, long, s6 = a_batch(tasks, "demo.sleep", {"seconds": 0.001}, {"seconds": 3.0})
    first = wait_terminal(tasks, s5)
    assert first.state == tpb.TASK_STATE_SUCCEEDED
    assert get_state(tasks, long) == tpb.TASK_STATE_RUNNING  # S5 ended while L ran
    ends = {name: wait_terminal(tasks, name, timeout=30) for name in (long, s6)}
    assert {tpb.TaskState.Name(t.state) for t in ends.values()} == {"TASK_STATE_SUCCEEDED"}
    assert ends[long].end_time.ToSeconds() - first.end_time.ToSeconds() >= 2
    assert sent_together(base) - before >= 2  # S5, L and S6 travelled in one request


def test_an_interrupt_of_a_task_in_a_batch_stops_it_alone(
    tasks: Any, cluster: Any, base: str
) -> None:
    pids = {e.pid for e in engines(cluster)}
    before = sent_together(base)
    s5, long, s6 = a_batch(tasks, "demo.spin", {"seconds": 0.001}, {"seconds": 30.0})
    wait_state(tasks, long, {tpb.TASK_STATE_RUNNING})
    # S6 waits on the engine behind L: GetCluster and the metric say so.
    wait_for(lambda: [e.queued_tasks for e in usable_engines(cluster)] == [1], timeout=10)
    assert value(scrape(base), "tether_engine_queued_tasks") == 1
    tasks.InterruptTask(spb.InterruptTaskRequest(name=long, reason="test"), timeout=10)
    stopped = wait_terminal(tasks, long)
    assert stopped.state == tpb.TASK_STATE_INTERRUPTED
    assert stopped.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    for name in (s5, s6):  # before it and behind it: untouched
        done = wait_terminal(tasks, name)
        assert done.state == tpb.TASK_STATE_SUCCEEDED, done
        assert not done.HasField("interrupt")
    assert {e.pid for e in engines(cluster)} == pids  # SIGINT was enough: no engine died
    assert sent_together(base) - before >= 2


def test_an_engine_lost_with_a_batch_ends_what_began_and_requeues_the_rest(
    tasks: Any, base: str
) -> None:
    before = sent_together(base)
    s5, long, s6 = a_batch(tasks, "demo.c_call", {"seconds": 0.001}, {"seconds": 60.0})
    wait_in_c_call(tasks, long)
    grace = tpb.GracePeriods(sigint=seconds(0.2), sigterm=seconds(0.2))
    tasks.InterruptTask(spb.InterruptTaskRequest(name=long, grace=grace), timeout=10)
    killed = wait_terminal(tasks, long)
    assert killed.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGKILL
    assert wait_terminal(tasks, s5).state == tpb.TASK_STATE_SUCCEEDED  # reported before the kill
    rerun = wait_terminal(tasks, s6, timeout=90)  # on the replacement engine
    assert rerun.state == tpb.TASK_STATE_SUCCEEDED, rerun
    assert rerun.engine_id != killed.engine_id
    assert sent_together(base) - before >= 2
