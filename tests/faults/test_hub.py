"""The ipyparallel controller (hub) dies or freezes under tether: it notices, says so, recovers."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc

from tests.integration.helpers import engines, get, submit, wait_pool, wait_state, wait_terminal
from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb

from .support import (
    NOT_SERVING,
    SERVING,
    EventRecorder,
    cluster_processes,
    gone,
    health,
    hub_process,
    wait_until,
)


def _lose_the_hub(data_dir: Path, sig: int, detect_within: float) -> None:
    with (
        ServerProcess(data_dir, engines=1, extra_args=FAST_SERVER_ARGS) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)
        recorder = EventRecorder(channel)
        try:
            assert server.proc is not None
            old = {p.pid for p in cluster_processes(server.proc.pid)}
            hub = hub_process(server.proc.pid)
            running = submit(tasks, "demo.sleep", args={"seconds": 30})
            wait_state(tasks, running.name, {tpb.TASK_STATE_RUNNING})
            pending = submit(tasks, "demo.echo", args={"value": "after the outage"})
            assert get(tasks, pending.name).state == tpb.TASK_STATE_PENDING

            hub.send_signal(sig)
            wait_until(lambda: health(channel) == NOT_SERVING, detect_within, "NOT_SERVING")
            ended = wait_terminal(tasks, running.name, timeout=detect_within)
            assert ended.state == tpb.TASK_STATE_FAILED
            assert ended.error.reason == "CLUSTER_LOST"

            # tether restarts the cluster by itself; the queued task then runs.
            wait_until(lambda: health(channel) == SERVING, 60, "SERVING again")
            done = wait_terminal(tasks, pending.name, timeout=60)
            assert done.state == tpb.TASK_STATE_SUCCEEDED
            assert done.result.string_value == "after the outage"
            wait_pool(cluster, 1)
            # Nothing of the old cluster survived: not the frozen hub, not its engines.
            wait_until(lambda: all(gone(pid) for pid in old), 10, "old processes gone")
            assert len(engines(cluster)) >= 1

            # Every stream saw the end, with its reason.
            wait_until(lambda: recorder.of_task(running.name), 5, "events of the task")
            finals = [
                e for e in recorder.of_task(running.name) if e.task.state == tpb.TASK_STATE_FAILED
            ]
            assert [e.task.error.reason for e in finals] == ["CLUSTER_LOST"]
        finally:
            recorder.close()


def test_a_killed_hub_fails_running_tasks_cluster_lost_and_the_cluster_comes_back(
    data_dir: Path,
) -> None:
    _lose_the_hub(data_dir, signal.SIGKILL, detect_within=10)


def test_a_frozen_hub_is_found_by_the_liveness_probe_and_handled_the_same_way(
    data_dir: Path,
) -> None:
    _lose_the_hub(data_dir, signal.SIGSTOP, detect_within=20)


def test_a_task_whose_policy_retries_cluster_loss_runs_again_on_the_new_cluster(
    data_dir: Path,
) -> None:
    with (
        ServerProcess(data_dir, engines=1, extra_args=FAST_SERVER_ARGS) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        assert server.proc is not None
        hub = hub_process(server.proc.pid)
        policy = tpb.RetryPolicy(max_attempts=2, retry_on=["CLUSTER_LOST"])
        task = submit(tasks, "demo.sleep", args={"seconds": 1.0}, retry=policy)
        wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
        hub.send_signal(signal.SIGKILL)
        done = wait_terminal(tasks, task.name, timeout=90)
        assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
        first, second = done.attempts
        assert (first.ending, first.reason) == (tpb.ATTEMPT_ENDING_RETRIED, "CLUSTER_LOST")
        assert second.ending == tpb.ATTEMPT_ENDING_FINAL
