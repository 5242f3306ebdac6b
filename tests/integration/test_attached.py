"""Attached mode: tether drives a cluster it did not start, and leaves it running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from tests.support import ServerProcess, pid_alive
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether_server.cluster.processes import pids_in_cluster_file

from .conftest import wait_for
from .helpers import TaskStream, get, stream_token, submit, wait_state, wait_terminal

_START = """
import logging, sys, ipyparallel as ipp
c = ipp.Cluster(n=2, profile_dir=sys.argv[1], cluster_id="external", controller_ip="127.0.0.1",
                controller_args=["--HeartMonitor.period=500"], delay=0, shutdown_atexit=False,
                log_level=logging.WARNING)
c.start_cluster_sync()
print(c.cluster_file, flush=True)
"""

_STOP = """
import sys, ipyparallel as ipp
ipp.Cluster.from_file(sys.argv[1]).stop_cluster_sync()
"""


_ADD_ENGINE = """
import sys, ipyparallel as ipp
ipp.Cluster.from_file(sys.argv[1]).start_engines_sync(1)
"""


CLUSTER_TAG = "TETHER_TEST_EXTERNAL_CLUSTER"
"""Environment variable every process of an external test cluster inherits: its profile."""


def kill_cluster_pids(pids: list[int]) -> None:
    """SIGKILL the processes of a cluster file and their descendants."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()


def kill_external_cluster(profile: Path) -> None:
    """SIGKILL, by pid, every process started for the external cluster of ``profile``.

    The cluster file lists the launchers' pids, but the cluster outlives the process that
    started it (its processes are re-parented to init) and a file written again by a
    restarted cluster forgets the first one's: every process that inherited this
    cluster's tag is found instead (hub, schedulers, engines, nannies).
    """
    tag = str(profile)
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(CLUSTER_TAG) == tag:
                proc.kill()


def start_external_cluster(profile: Path) -> Path:
    """Start an ipyparallel cluster of its own (as an operator would); its cluster file."""
    out = subprocess.run(
        [sys.executable, "-c", _START, str(profile)],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
        env={**os.environ, CLUSTER_TAG: str(profile)},
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def external_cluster(tmp_path: Path) -> Iterator[Path]:
    profile = tmp_path / "external-profile"
    cluster_file = start_external_cluster(profile)
    pids = pids_in_cluster_file(cluster_file)
    try:
        yield cluster_file
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(
                [sys.executable, "-c", _STOP, str(cluster_file)], timeout=60, check=False
            )
        kill_cluster_pids(pids)
        kill_external_cluster(profile)


def test_attached_server_runs_tasks_reports_a_lost_engine_as_degraded_and_leaves_the_cluster_running(
    external_cluster: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        tmp_path / "data", engines=2, extra_args=["--attach", str(external_cluster)]
    )
    with server, grpc.insecure_channel(server.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        cluster = cluster_service_pb2_grpc.ClusterServiceStub(ch)
        task = submit(tasks, "demo.echo", args={"value": "attached"})
        assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED
        info = wait_for(
            lambda: (
                (r := cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)).mode
                == cpb.CLUSTER_MODE_ATTACHED
                and len([e for e in r.engines if e.state == cpb.ENGINE_STATE_IDLE]) == 2
                and r
            )
        )
        victim, survivor = info.engines[0], info.engines[1]
        os.kill(victim.pid, signal.SIGKILL)
        degraded = wait_for(
            lambda: (r := cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)).degraded and r
        )
        states = {e.id: e.state for e in degraded.engines}
        assert states[victim.id] == cpb.ENGINE_STATE_LOST
        assert len(degraded.engines) == 2  # no replacement in attached mode
        task = submit(tasks, "demo.echo", args={"value": "still works"})
        assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED
        # The operator's launcher adds an engine: tether sets it up, the pool is whole.
        subprocess.run(
            [sys.executable, "-c", _ADD_ENGINE, str(external_cluster)],
            timeout=90,
            check=True,
            env={**os.environ, CLUSTER_TAG: str(tmp_path / "external-profile")},
        )
        whole = wait_for(
            lambda: (
                not (r := cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)).degraded and r
            ),
            timeout=60,
        )
        idle = [e.id for e in whole.engines if e.state == cpb.ENGINE_STATE_IDLE]
        assert len(idle) == 2 and victim.id not in idle
    # The server is gone; the cluster it attached to is not.
    assert pid_alive(survivor.pid)


def test_a_restarted_server_reattaches_to_the_work_it_left_on_the_cluster(
    external_cluster: Path, tmp_path: Path
) -> None:
    """Killed with a task running, one that ends while it is down and one queued behind:
    the next server delivers every result, each task having run exactly once."""
    data, runs = tmp_path / "data", tmp_path / "runs.txt"
    attach = ["--attach", str(external_cluster)]
    first = ServerProcess(data, engines=2, extra_args=attach)
    # In a with block: a failing assertion must not leave the first server running.
    with first, grpc.insecure_channel(first.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        long = submit(tasks, "demo.count", args={"n": 150, "interval": 0.1})  # 15 s
        stream = TaskStream(tasks, long.name)
        stream.wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_PROGRESS)
        busy_engine = get(tasks, long.name).engine_id
        short = submit(
            tasks, "demo.append", args={"path": str(runs), "line": "short", "seconds": 1}
        )
        wait_state(tasks, short.name, {tpb.TASK_STATE_RUNNING})
        # Pipelined dispatch queues it behind one of the two (the store says PENDING).
        queued = submit(tasks, "demo.append", args={"path": str(runs), "line": "queued"})
        token = stream_token(tasks)
        assert get(tasks, queued.name).state == tpb.TASK_STATE_PENDING
        first.kill()  # a crash: the cluster, and the work on its engines, live on
    time.sleep(2)  # the short task ends while no server listens
    second = ServerProcess(data, port=first.port, engines=2, extra_args=attach)
    with second, grpc.insecure_channel(second.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        # The stream resumes where the first server's left off: the task goes on.
        resumed = TaskStream(tasks, long.name, resume_token=token)
        _, running = resumed.wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_PROGRESS)
        assert running.task.state == tpb.TASK_STATE_RUNNING
        new = [submit(tasks, "demo.echo", args={"value": i}) for i in range(4)]
        ran_on = {wait_terminal(tasks, t.name, timeout=60).engine_id for t in new}
        assert busy_engine not in ran_on  # the engine of the adopted task took no new work
        for task in (short, queued):
            done = wait_terminal(tasks, task.name, timeout=60)
            assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
        _, end = resumed.terminal(timeout=60)
        assert end.task.state == tpb.TASK_STATE_SUCCEEDED, end.task.error
        whole = get(tasks, long.name)
        assert (whole.attempt, whole.engine_id, whole.result.number_value) == (1, busy_engine, 150)
        assert whole.output.endswith("step 150\n")
        # Nothing ran twice: the queued attempt either ran on its engine (and was found)
        # or was withdrawn there before it began and ran once elsewhere.
        assert sorted(runs.read_text().split()) == ["queued", "short"]
        assert all(e.task.state != tpb.TASK_STATE_FAILED for _, e in resumed.events)


def test_a_detached_task_can_be_interrupted_by_the_next_server_and_its_engine_serves_again(
    external_cluster: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    attach = ["--attach", str(external_cluster)]
    first = ServerProcess(data, engines=2, extra_args=attach)
    # In a with block: a failing assertion must not leave the first server running.
    with first, grpc.insecure_channel(first.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        old = submit(tasks, "demo.sleep", args={"seconds": 60})
        engine = wait_state(tasks, old.name, {tpb.TASK_STATE_RUNNING}).engine_id
        assert first.stop() == 0  # a graceful stop detaches from an attached cluster
    second = ServerProcess(data, port=first.port, engines=2, extra_args=attach)
    with second, grpc.insecure_channel(second.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        assert get(tasks, old.name).state == tpb.TASK_STATE_RUNNING
        tasks.InterruptTask(spb.InterruptTaskRequest(name=old.name, reason="enough"), timeout=10)
        done = wait_terminal(tasks, old.name, timeout=30)
        assert done.state == tpb.TASK_STATE_INTERRUPTED
        assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
        assert "[on_interrupt] demo.sleep cleaned up" in done.output
        # The engine lived through its SIGINT and serves this server now.
        cluster = cluster_service_pb2_grpc.ClusterServiceStub(ch)
        wait_for(
            lambda: any(
                e.id == engine and e.state == cpb.ENGINE_STATE_IDLE
                for e in cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
            ),
            timeout=60,
        )
