"""Engines on other hosts, placed by ipyparallel's SSH launcher, owned by tether.

One server for the module, with no engine of its own and one engine on each of two
namespaced hosts (``h2``, ``h3``: netns.py), reached over their veth addresses. Every
feature of the interrupt ladder is checked against a remote engine; pids of remote
engines and their task's children are only ever looked at on their host, over ssh.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import (
    running_server_with_env,
    seconds,
    submit,
    wait_state,
    wait_terminal,
)
from tests.support import FAST_SERVER_ARGS, REPO, ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .netns import TestHost

MEMORY_LIMIT_MIB = 600


def remote_pythonpath() -> str:
    """The repository (for --task-module tests...) and whatever this run's PYTHONPATH holds."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def server_args(hosts: list[TestHost], hosts_file: Path) -> list[str]:
    """The flags of a server whose engines all run on ``hosts`` (one each)."""
    hosts_file.write_text(
        "".join(f'[hosts.{h.label}]\nssh = "{h.location}"\nengines = 1\n\n' for h in hosts)
    )
    args = [
        "--engines", "0",
        "--hosts-file", str(hosts_file),
        "--cluster-ip", hosts[0].root_address,
        "--ssh-key", str(hosts[0].client_key),
        "--remote-env", f"PYTHONPATH={remote_pythonpath()}",
        "--task-module", "tests.integration.tasks_for_tests",
        "--load-interval", "1s",
        "--no-http",
    ]  # fmt: skip
    for option in ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"):
        args += ["--ssh-option", option]
    return args


@pytest.fixture(scope="module")
def server(
    hosts: list[TestHost], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("remote")
    extra = [
        *FAST_SERVER_ARGS,
        *server_args(hosts, base / "hosts.toml"),
        "--memory-limit",
        f"{MEMORY_LIMIT_MIB}MiB",
    ]
    with running_server_with_env(base / "data", {}, engines=0, extra_args=extra) as proc:
        yield proc


def pool(
    cluster: cluster_service_pb2_grpc.ClusterServiceStub,
    timeout: float = 90.0,
    on: tuple[str, ...] = ("h2", "h3"),
) -> dict[str, cpb.Engine]:
    """Wait until each host of ``on`` has an IDLE engine; the idle engines by host."""
    deadline = time.monotonic() + timeout
    while True:
        reply = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
        idle = {e.host: e for e in reply.engines if e.state == cpb.ENGINE_STATE_IDLE}
        if set(on) <= set(idle):
            return idle
        if time.monotonic() > deadline:
            raise TimeoutError(f"engines: {list(reply.engines)}")
        time.sleep(0.1)


def host_of(hosts: list[TestHost], name: str) -> TestHost:
    return next(h for h in hosts if h.label == name)


def alive_on(host: TestHost, pid: int) -> bool:
    """Whether ``pid`` (a pid of the host's own PID namespace) runs there, not a zombie."""
    done = host.run(f"grep -q '^State:.*Z' /proc/{pid}/status || kill -0 {pid}")
    return done.returncode == 0


def pin_to(
    tasks: task_service_pb2_grpc.TaskServiceStub, engines: dict[str, cpb.Engine], host: str
) -> str:
    """Keep the other host's engine busy for a while, so the next task lands on ``host``."""
    other = next(name for name in engines if name != host)
    blocker = submit(tasks, "demo.sleep", args={"seconds": 300})
    running = wait_state(tasks, blocker.name, {tpb.TASK_STATE_RUNNING})
    if running.engine_id != engines[other].id:  # it went to ``host``: swap roles
        second = submit(tasks, "demo.sleep", args={"seconds": 300})
        wait_state(tasks, second.name, {tpb.TASK_STATE_RUNNING})
        tasks.InterruptTask(spb.InterruptTaskRequest(name=blocker.name), timeout=10)
        wait_terminal(tasks, blocker.name, timeout=15)
        return second.name
    return blocker.name


def release(tasks: task_service_pb2_grpc.TaskServiceStub, name: str) -> None:
    """End a blocker (it may have ended by itself in a long test)."""
    try:
        tasks.InterruptTask(spb.InterruptTaskRequest(name=name), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
    wait_terminal(tasks, name, timeout=15)


# --------------------------------------------------------------------------- placement
def test_engines_run_on_their_hosts_with_pids_of_those_hosts(cluster, hosts) -> None:  # type: ignore[no-untyped-def]
    engines = pool(cluster)
    reply = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
    assert reply.target_size == 2 and not reply.degraded
    for name, engine in engines.items():
        cmdline = host_of(hosts, name).run(f"tr '\\0' ' ' < /proc/{engine.pid}/cmdline").stdout
        assert "ipyparallel.engine" in cmdline, (name, engine.pid, cmdline)


def test_tasks_land_on_the_engines_of_both_hosts(tasks, cluster) -> None:  # type: ignore[no-untyped-def]
    engines = pool(cluster)
    first = submit(tasks, "demo.sleep", args={"seconds": 1.5})
    second = submit(tasks, "demo.sleep", args={"seconds": 1.5})
    ran_on = {wait_terminal(tasks, t.name, timeout=30).engine_id for t in (first, second)}
    assert ran_on == {e.id for e in engines.values()}
    assert wait_terminal(tasks, first.name).state == tpb.TASK_STATE_SUCCEEDED


def test_cluster_shows_each_engines_load_measured_on_its_host(cluster) -> None:  # type: ignore[no-untyped-def]
    pool(cluster)
    deadline = time.monotonic() + 15
    while True:
        engines = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        loaded = [e for e in engines if e.state == cpb.ENGINE_STATE_IDLE and e.HasField("load")]
        if len(loaded) >= 2:
            break
        assert time.monotonic() < deadline, list(engines)
        time.sleep(0.2)
    for engine in loaded:
        assert engine.load.rss_bytes > 20 * 1024 * 1024
        assert engine.load.cpu_percent >= 0
        assert engine.load.HasField("report_time")


# --------------------------------------------------------------------------- the ladder
def test_sigint_interrupts_a_task_on_a_remote_engine_which_stays(tasks, cluster) -> None:  # type: ignore[no-untyped-def]
    engines = pool(cluster)
    task = submit(tasks, "demo.sleep", args={"seconds": 60})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(0.3)
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, reason="test"), timeout=10)
    done = wait_terminal(tasks, task.name, timeout=10)
    assert done.state == tpb.TASK_STATE_INTERRUPTED
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    assert running.engine_id in {e.id for e in pool(cluster).values()}
    assert {e.id for e in engines.values()} == {e.id for e in pool(cluster).values()}


def test_sigterm_ends_a_stubborn_task_on_a_remote_engine(tasks, cluster) -> None:  # type: ignore[no-untyped-def]
    pool(cluster)
    task = submit(tasks, "demo.stubborn", args={"seconds": 60})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(0.3)
    grace = tpb.GracePeriods(sigint=seconds(0.3), sigterm=seconds(5))
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10)
    done = wait_terminal(tasks, task.name, timeout=20)
    assert done.state == tpb.TASK_STATE_INTERRUPTED
    assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGTERM
    assert running.engine_id in {e.id for e in pool(cluster).values()}


def test_sigkill_of_a_remote_engine_kills_its_tasks_child_there_and_replaces_it_on_that_host(  # type: ignore[no-untyped-def]
    tasks, cluster, hosts
) -> None:
    for target in ("h2", "h3"):
        engines = pool(cluster)
        blocker = pin_to(tasks, engines, target)
        task = submit(tasks, "test.spawn_c_call", args={"seconds": 60})
        running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
        assert running.engine_id == engines[target].id
        deadline = time.monotonic() + 10
        while not (found := re.search(r"child pid (\d+)", tasks_output(tasks, task.name))):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child = int(found.group(1))
        host = host_of(hosts, target)
        assert alive_on(host, child)
        grace = tpb.GracePeriods(sigint=seconds(0.3), sigterm=seconds(0.3))
        tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, grace=grace), timeout=10)
        done = wait_terminal(tasks, task.name, timeout=30)
        assert done.state == tpb.TASK_STATE_INTERRUPTED
        assert done.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGKILL
        # The watchdog beside the engine killed the child on the engine's host.
        deadline = time.monotonic() + 5
        while alive_on(host, child):
            assert time.monotonic() < deadline, f"child {child} still runs on {target}"
            time.sleep(0.1)
        release(tasks, blocker)
        after = pool(cluster)
        assert after[target].id != engines[target].id  # replaced, on the same host
        assert len(host.processes("ipyparallel.engine.nanny")) == 1


def tasks_output(tasks: task_service_pb2_grpc.TaskServiceStub, name: str) -> str:
    task = tasks.GetTask(spb.GetTaskRequest(name=name, view=tpb.TASK_VIEW_FULL), timeout=10)
    return str(task.task.output)


def test_memory_limit_is_measured_on_the_remote_host(tasks, cluster) -> None:  # type: ignore[no-untyped-def]
    pool(cluster)
    task = submit(tasks, "demo.hold", args={"mb": MEMORY_LIMIT_MIB + 200, "seconds": 60})
    done = wait_terminal(tasks, task.name, timeout=40)
    assert done.state == tpb.TASK_STATE_INTERRUPTED, done
    assert done.interrupt.cause == tpb.INTERRUPT_CAUSE_RESOURCE_LIMIT
    assert "measured on its host" in done.interrupt.reason
    pool(cluster)


# --------------------------------------------------------------------------- host loss
def test_a_host_cut_off_loses_its_engines_and_gets_them_back_with_its_link(  # type: ignore[no-untyped-def]
    tasks, cluster, hosts
) -> None:
    engines = pool(cluster)
    blocker = pin_to(tasks, engines, "h3")
    task = submit(tasks, "demo.sleep", args={"seconds": 120})
    running = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    assert running.engine_id == engines["h3"].id
    h3 = host_of(hosts, "h3")
    h3.set_link(False)
    try:
        # The hub's heartbeat (500 ms x 10 misses) declares the engine lost.
        done = wait_terminal(tasks, task.name, timeout=60)
        assert done.state == tpb.TASK_STATE_FAILED
        assert done.error.reason == "ENGINE_LOST"
        reply = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
        assert reply.degraded
        assert not [e for e in reply.engines if e.host == "h3" and e.state == cpb.ENGINE_STATE_IDLE]
        time.sleep(3)  # replacements there fail while the link is down: still degraded
        assert cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).degraded
    finally:
        h3.set_link(True)
    back = pool(cluster, timeout=120, on=("h3",))  # h2 still runs the blocker
    assert back["h3"].id != engines["h3"].id
    assert not cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).degraded
    # The cut-off engine was stopped on its host once it could be reached: one engine there.
    deadline = time.monotonic() + 30
    while len(h3.processes("ipyparallel.engine.nanny")) != 1:
        assert time.monotonic() < deadline, [p.cmdline() for p in h3.processes("ipyparallel")]
        time.sleep(0.2)
    release(tasks, blocker)
    nxt = submit(tasks, "demo.echo", args={"value": "after"})
    assert wait_terminal(tasks, nxt.name, timeout=30).state == tpb.TASK_STATE_SUCCEEDED


# --------------------------------------------------------------------------- stopping
def _idle(stub: cluster_service_pb2_grpc.ClusterServiceStub) -> int:
    engines = stub.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
    return len([e for e in engines if e.state == cpb.ENGINE_STATE_IDLE])


def test_stopping_tether_stops_its_remote_engines_and_their_watchdogs(hosts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A server of its own (the module's keeps running): after its stop, only the module
    server's processes are left on the hosts."""
    extra = [*FAST_SERVER_ARGS, *server_args(hosts, tmp_path / "hosts.toml")]

    def counts() -> dict[str, tuple[int, int]]:
        return {
            h.label: (
                len(h.processes("ipyparallel.engine")),
                len(h.processes("tether_server.runtime.watchdog")),
            )
            for h in hosts
        }

    before = counts()
    with running_server_with_env(tmp_path / "data", {}, engines=0, extra_args=extra) as proc:
        with grpc.insecure_channel(proc.address) as ch:
            stub = cluster_service_pb2_grpc.ClusterServiceStub(ch)
            deadline = time.monotonic() + 90
            while _idle(stub) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        during = counts()
        for h in hosts:
            assert during[h.label][0] > before[h.label][0]
            assert during[h.label][1] > before[h.label][1]
    deadline = time.monotonic() + 15
    while counts() != before:
        assert time.monotonic() < deadline, (before, counts())
        time.sleep(0.2)


def test_a_server_started_after_a_crash_stops_the_remote_engines_the_crashed_one_left(  # type: ignore[no-untyped-def]
    hosts, tmp_path
) -> None:
    extra = [*FAST_SERVER_ARGS, *server_args(hosts, tmp_path / "hosts.toml")]
    data = tmp_path / "data"

    def engine_pids() -> set[int]:
        return {p.pid for h in hosts for p in h.processes("-m ipyparallel.engine ")}

    before = engine_pids()
    with running_server_with_env(data, {}, engines=0, extra_args=extra) as first:
        with grpc.insecure_channel(first.address) as ch:
            stub = cluster_service_pb2_grpc.ClusterServiceStub(ch)
            deadline = time.monotonic() + 90
            while _idle(stub) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        left = engine_pids() - before
        assert len(left) == 2
        first.kill()  # SIGKILL: nothing stops the remote engines
    assert left <= engine_pids()  # still running on their hosts
    with running_server_with_env(data, {}, engines=0, extra_args=extra):
        deadline = time.monotonic() + 30
        while left & engine_pids():
            assert time.monotonic() < deadline, left & engine_pids()
            time.sleep(0.2)
