"""Interrupt storm: many short tasks, interrupts at random moments."""

from __future__ import annotations

import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .helpers import TERMINAL, get, struct, wait_terminal

N_TASKS = 500


def test_interrupt_storm_loses_nothing_kills_no_engine_and_hits_only_its_targets(tasks, cluster):  # type: ignore[no-untyped-def]
    storm(tasks, cluster, [0.0, 0.001, 0.003, 0.01, 0.03], N_TASKS)


def storm(tasks, cluster, durations: list[float], n_tasks: int, threads: int = 8) -> None:  # type: ignore[no-untyped-def]
    """Submit ``n_tasks`` ``demo.sleep`` of random ``durations`` from ``threads``, interrupt
    half of them at random moments, and check that nothing was lost, no engine died and
    no task that nobody interrupted was touched."""
    rng = random.Random(1234)
    engines_before = {
        e.id: e.pid
        for e in cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        if e.state in (cpb.ENGINE_STATE_IDLE, cpb.ENGINE_STATE_BUSY)
    }
    listing = tasks.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10)
    token = listing.resume_token

    # Watch everything from now on and count terminal events per task.
    terminal_events: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def watch() -> None:
        call = tasks.StreamTaskStatus(
            spb.StreamTaskStatusRequest(resume_token=token, exclude_progress=True)
        )
        try:
            for resp in call:
                if (
                    resp.HasField("task_event")
                    and resp.task_event.type == spb.TASK_EVENT_TYPE_STATE_CHANGED
                ) and resp.task_event.task.state in TERMINAL:
                    terminal_events[resp.task_event.task.name] += 1
                if stop.is_set():
                    call.cancel()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    targets: set[str] = set()
    names: list[str] = []

    def one(i: int) -> None:
        seconds = rng.choice(durations)
        resp = tasks.SubmitTask(
            spb.SubmitTaskRequest(task="demo.sleep", args=struct({"seconds": seconds})), timeout=30
        )
        names.append(resp.task.name)
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.02)
            targets.add(resp.task.name)
            try:
                tasks.InterruptTask(
                    spb.InterruptTaskRequest(name=resp.task.name, reason="storm"), timeout=30
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION  # it already finished

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n_tasks)))

    final = {name: wait_terminal(tasks, name, timeout=120) for name in names}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(terminal_events[n] for n in names) < len(names):
        time.sleep(0.1)
    stop.set()
    tasks.SubmitTask(spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": 0})), timeout=10)
    watcher.join(10)

    assert len(final) == n_tasks
    # Exactly one terminal event per task.
    assert {n: terminal_events[n] for n in names} == {n: 1 for n in names}
    # Tasks nobody interrupted all succeeded: no stray signal touched them.
    untouched = [final[n] for n in names if n not in targets]
    assert all(t.state == tpb.TASK_STATE_SUCCEEDED for t in untouched), collections.Counter(
        (tpb.TaskState.Name(t.state), t.error.type) for t in untouched
    )
    assert all(not t.HasField("interrupt") for t in untouched)
    # Interrupted tasks ended in a state an interrupt allows.
    allowed = {tpb.TASK_STATE_INTERRUPTED, tpb.TASK_STATE_CANCELLED, tpb.TASK_STATE_SUCCEEDED}
    assert all(final[n].state in allowed for n in targets)
    # No engine died.
    engines_after = {
        e.id: e.pid
        for e in cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        if e.state in (cpb.ENGINE_STATE_IDLE, cpb.ENGINE_STATE_BUSY)
    }
    assert engines_after == engines_before
    lost = [
        e
        for e in cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        if e.state == cpb.ENGINE_STATE_LOST
    ]
    assert not [e for e in lost if e.id in engines_before]
    assert get(tasks, names[0]).state in TERMINAL
