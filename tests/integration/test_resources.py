"""What an engine gives back after a task: memory, child processes; memory limit; engine tags.

One server for most of the module: two engines tagged ``gpu`` (``CUDA_VISIBLE_DEVICES`` is
emptied so a real GPU host detects nothing of its own), an RSS tolerance of 64 MiB, a
memory limit well above an idle engine (torch is preloaded: about 250 MiB) and the
test-only tasks of ``tests.integration.tasks_for_tests``. A second, one-engine server
without tags serves the test of a task that no engine can take.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.support import FAST_GRACE, ServerProcess, pid_alive
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .conftest import wait_for
from .helpers import (
    SINGLE_THREADED_TORCH,
    TaskStream,
    engines,
    error_info,
    running_server_with_env,
    seconds,
    stream_token,
    submit,
    usable_engines,
    wait_pool,
    wait_terminal,
)

MiB = 1024 * 1024
RSS_TOLERANCE = 64 * MiB
MEMORY_LIMIT = 768 * MiB
NO_GPU = {**SINGLE_THREADED_TORCH, "CUDA_VISIBLE_DEVICES": ""}


def _stubs(address: str) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(address) as channel:
        yield (
            task_service_pb2_grpc.TaskServiceStub(channel),
            cluster_service_pb2_grpc.ClusterServiceStub(channel),
        )


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [
        *FAST_GRACE,
        "--engine-tag",
        "gpu",
        "--rss-tolerance",
        f"{RSS_TOLERANCE // MiB}MiB",
        "--memory-limit",
        f"{MEMORY_LIMIT // MiB}MiB",
        "--task-module",
        "tests.integration.tasks_for_tests",
    ]
    data = tmp_path_factory.mktemp("resources-server") / "data"
    with running_server_with_env(data, NO_GPU, engines=2, extra_args=args) as server:
        yield server


@pytest.fixture(scope="module")
def stubs(gpu_server: ServerProcess) -> Iterator[tuple[Any, Any]]:
    yield from _stubs(gpu_server.address)


@pytest.fixture()
def tasks(stubs: tuple[Any, Any]) -> task_service_pb2_grpc.TaskServiceStub:
    return stubs[0]  # type: ignore[no-any-return]


@pytest.fixture()
def cluster(stubs: tuple[Any, Any]) -> cluster_service_pb2_grpc.ClusterServiceStub:
    wait_pool(stubs[1], 2)  # every test starts from a full, idle pool
    return stubs[1]  # type: ignore[no-any-return]


def _engine(cluster: Any, engine_id: int) -> cpb.Engine:
    return next(e for e in engines(cluster) if e.id == engine_id)


def _child_pid(stream: TaskStream) -> int:
    """The pid a spawning task reports in its first output chunk."""
    _, event = stream.wait_for(lambda e: "child pid" in e.output_chunk, timeout=60)
    match = re.search(r"child pid (\d+)", event.output_chunk)
    assert match, event.output_chunk
    return int(match.group(1))


# --------------------------------------------------------------------------- recycling
def test_engine_that_keeps_leaked_memory_is_recycled_and_replaced(tasks, cluster):  # type: ignore[no-untyped-def]
    before = {e.id for e in usable_engines(cluster)}
    task = submit(tasks, "demo.leak", args={"mb": 200})
    done = wait_terminal(tasks, task.name)
    assert done.state == tpb.TASK_STATE_SUCCEEDED
    resources = done.resources
    assert resources.rss_after_bytes - resources.rss_before_bytes > 190 * MiB  # the leak stays
    assert not resources.reclaimed, resources.summary
    assert resources.engine_recycled
    leaky = done.engine_id
    wait_for(lambda: _engine(cluster, leaky).state == cpb.ENGINE_STATE_LOST, timeout=30)
    pool = wait_pool(cluster, 2, timeout=60)
    replacements = {e.id for e in pool} - before
    assert leaky not in {e.id for e in pool} and len(replacements) == 1
    # The refilled pool runs tasks, on the replacement too: two at once take both engines.
    follow = [submit(tasks, "demo.sleep", args={"seconds": 0.5}) for _ in range(2)]
    ran = [wait_terminal(tasks, f.name) for f in follow]
    assert all(f.state == tpb.TASK_STATE_SUCCEEDED for f in ran)
    assert replacements <= {f.engine_id for f in ran}


# --------------------------------------------------------------------------- children
@pytest.mark.parametrize(
    ("task_name", "stage", "settle"),
    [
        # The runtime stops the task's children before it reports the outcome...
        ("demo.spawn", tpb.ESCALATION_STAGE_SIGINT, 0.0),
        ("test.spawn_stubborn", tpb.ESCALATION_STAGE_SIGTERM, 0.0),
        # ...but a SIGKILLed engine reports nothing: the controller kills the engine's
        # descendants right after the engine, racing the hub's news of its death.
        ("test.spawn_c_call", tpb.ESCALATION_STAGE_SIGKILL, 2.0),
    ],
    ids=["SIGINT", "SIGTERM", "SIGKILL"],
)
def test_interrupted_task_leaves_no_child_process_behind(tasks, cluster, task_name, stage, settle):  # type: ignore[no-untyped-def]
    token = stream_token(tasks)
    task = submit(tasks, task_name, args={"seconds": 60})
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        child = _child_pid(stream)
        assert pid_alive(child)
        time.sleep(0.2)  # the task is past its spawn, into what resists the signal
        grace = tpb.GracePeriods(sigint=seconds(0.3), sigterm=seconds(0.3), sigkill=seconds(5))
        tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10)
        _, terminal = stream.terminal(timeout=30)
    assert terminal.task.state == tpb.TASK_STATE_INTERRUPTED
    assert terminal.task.interrupt.final_stage == stage
    if settle:
        wait_for(lambda: not pid_alive(child), timeout=settle)
    assert not pid_alive(child), f"child {child} outlived {task_name}"
    if stage != tpb.ESCALATION_STAGE_SIGKILL:
        # The runtime killed the child itself: nothing is left, so the engine is kept.
        assert terminal.task.resources.leftover_children == 1
        assert terminal.task.resources.reclaimed
        assert not terminal.task.resources.engine_recycled


# --------------------------------------------------------------------------- memory limit
@pytest.mark.parametrize(
    ("task_name", "args"),
    [
        ("demo.hold", {"mb": 1024, "seconds": 60}),
        ("llm.hold_memory", {"mb": 1024, "seconds": 60, "device": "cpu"}),
    ],
    ids=["demo.hold", "llm.hold_memory"],
)
def test_memory_limit_ends_a_task_with_resource_limit(tasks, cluster, task_name, args):  # type: ignore[no-untyped-def]
    token = stream_token(tasks)
    # Filling the buffer is one C call that defers SIGINT (over a second on a busy
    # machine): a generous grace lets the SIGINT land, so the engine reports its memory.
    grace = tpb.GracePeriods(sigint=seconds(10), sigterm=seconds(5))
    task = submit(tasks, task_name, args=args, grace=grace)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        _, terminal = stream.terminal(timeout=60)
    ended = terminal.task
    assert ended.state == tpb.TASK_STATE_INTERRUPTED
    assert ended.interrupt.cause == tpb.INTERRUPT_CAUSE_RESOURCE_LIMIT
    assert ended.error.reason == "RESOURCE_LIMIT"
    assert ended.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    assert ended.resources.reclaimed, ended.resources.summary


# --------------------------------------------------------------------------- engine tags
@pytest.fixture(scope="module")
def untagged_stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    data = tmp_path_factory.mktemp("untagged-server") / "data"
    with running_server_with_env(data, NO_GPU, engines=1, extra_args=FAST_GRACE) as server:
        yield from _stubs(server.address)


def test_task_requiring_gpu_is_refused_at_submit_when_no_engine_can_carry_it(  # type: ignore[no-untyped-def]
    untagged_stubs,
):
    """Embedded mode: every engine is the server's, so a tag none of them carries or would
    carry is refused at once (it used to wait PENDING until its queue timeout); attached
    mode keeps such a task PENDING (tests/integration/test_placement.py)."""
    tasks, cluster = untagged_stubs
    idle = wait_pool(cluster, 1)
    assert all("gpu" not in e.tags for e in idle)
    with pytest.raises(grpc.RpcError) as caught:
        submit(
            tasks, "demo.echo", args={"value": 1}, required_tags=["gpu"], queue_timeout=seconds(2)
        )
    code, reason, _metadata, _ = error_info(caught.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UNSCHEDULABLE")
    assert [e.state for e in engines(cluster)] == [cpb.ENGINE_STATE_IDLE]


def test_task_requiring_gpu_runs_on_engines_tagged_gpu(tasks, cluster):  # type: ignore[no-untyped-def]
    assert all("gpu" in e.tags for e in usable_engines(cluster))
    task = submit(
        tasks, "demo.echo", args={"value": 1}, required_tags=["gpu"], queue_timeout=seconds(10)
    )
    done = wait_terminal(tasks, task.name)
    assert done.state == tpb.TASK_STATE_SUCCEEDED
    assert done.required_tags == ["gpu"]
    assert done.HasField("engine_id")
