"""Tasks whose required_tags no engine can carry: refused (embedded), or timed out (attached)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc
import pytest

from tests.support import ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether_server.cluster.processes import pids_in_cluster_file

from .helpers import error_info, submit, wait_terminal
from .test_attached import kill_cluster_pids, kill_external_cluster, start_external_cluster


def test_a_task_no_engine_can_carry_is_refused_at_submit_and_not_stored(tasks) -> None:  # type: ignore[no-untyped-def]
    listed_before = tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks
    with pytest.raises(grpc.RpcError) as caught:
        submit(tasks, "demo.echo", args={"value": 1}, required_tags=["tpu-v9"])
    code, reason, metadata, _ = error_info(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert reason == "UNSCHEDULABLE"
    assert metadata["required_tags"] == "tpu-v9"
    listed_after = tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks
    assert len(listed_after) == len(listed_before)


def test_a_task_with_tags_that_no_engine_carries_but_none_required_still_runs(tasks) -> None:  # type: ignore[no-untyped-def]
    task = submit(tasks, "demo.echo", args={"value": 2})
    assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED


def test_attached_mode_shows_an_unschedulable_task_and_ends_it_by_the_default_queue_timeout(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "external-profile"
    cluster_file = start_external_cluster(profile)
    try:
        server = ServerProcess(
            tmp_path / "data",
            engines=2,
            extra_args=["--attach", str(cluster_file), "--unschedulable-queue-timeout", "3s"],
        )
        with server, grpc.insecure_channel(server.address) as ch:
            tasks = task_service_pb2_grpc.TaskServiceStub(ch)
            cluster = cluster_service_pb2_grpc.ClusterServiceStub(ch)
            task = submit(tasks, "demo.echo", args={"value": 1}, required_tags=["tpu-v9"])
            assert task.state == tpb.TASK_STATE_PENDING
            reply = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
            assert list(reply.unschedulable_tasks) == [task.name]
            t0 = time.monotonic()
            done = wait_terminal(tasks, task.name, timeout=30)
            assert done.state == tpb.TASK_STATE_FAILED
            assert done.error.reason == "QUEUE_TIMEOUT"
            assert 2.0 < time.monotonic() - t0 < 15
            reply = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
            assert not reply.unschedulable_tasks
            # A task that fits waits without a timeout of its own (none by default).
            fits = submit(tasks, "demo.echo", args={"value": 2})
            assert not fits.HasField("queue_timeout")
    finally:
        with contextlib.suppress(Exception):
            kill_cluster_pids(pids_in_cluster_file(cluster_file))
        kill_external_cluster(profile)
