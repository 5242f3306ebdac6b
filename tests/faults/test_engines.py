"""Lost engines are really gone: frozen or orphaned engines are killed, and replaced."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
import pytest

from tests.integration.helpers import submit, usable_engines, wait_pool, wait_state, wait_terminal
from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb

from .support import gone, nanny_of, wait_until


def _busy_engine(data_dir: Path, server: ServerProcess, channel: grpc.Channel) -> tuple[str, int]:
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)
    wait_pool(cluster, 2)
    # The task starts a child process of its own: it must die with its engine.
    task = submit(tasks, "demo.spawn", args={"seconds": 60})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    engine = next(e for e in usable_engines(cluster) if e.id == running.engine_id)
    wait_until(lambda: psutil.Process(engine.pid).children(), 10, "the task's child process")
    return task.name, engine.pid


def _assert_lost_and_replaced(channel: grpc.Channel, name: str, pids: list[int]) -> None:
    tasks = task_service_pb2_grpc.TaskServiceStub(channel)
    cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)
    ended = wait_terminal(tasks, name, timeout=30)
    assert ended.state == tpb.TASK_STATE_FAILED
    assert ended.error.reason == "ENGINE_LOST"
    wait_until(lambda: all(gone(pid) for pid in pids), 5, f"processes {pids} gone")
    wait_pool(cluster, 2)  # a replacement keeps the pool at its size


def _freeze(pid: int) -> None:
    psutil.Process(pid).send_signal(signal.SIGSTOP)


def _kill_nanny(pid: int) -> None:
    nanny_of(pid).kill()


@pytest.mark.parametrize(
    "fault",
    [_freeze, _kill_nanny],
    ids=["frozen engine (SIGSTOP)", "nanny killed"],
)
def test_a_lost_engine_is_killed_with_its_task_children_and_replaced(
    data_dir: Path, fault: Callable[[int], None]
) -> None:
    with (
        ServerProcess(data_dir, engines=2, extra_args=FAST_SERVER_ARGS) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        name, pid = _busy_engine(data_dir, server, channel)
        family = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
        fault(pid)
        _assert_lost_and_replaced(channel, name, family)
