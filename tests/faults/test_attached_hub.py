"""Attached mode: the external cluster's hub dies; tether says so and reconnects by itself."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import grpc
import psutil

from tests.integration.helpers import submit, wait_state, wait_terminal
from tests.integration.test_attached import (
    kill_cluster_pids,
    kill_external_cluster,
    start_external_cluster,
)
from tests.support import ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2_grpc
from tether_server.cluster.processes import pids_in_cluster_file

from .support import NOT_SERVING, SERVING, health, wait_until


def _kill_hub(cluster_file: Path) -> None:
    """The external cluster's controller dies (its engines are left, orphaned)."""
    pid = json.loads(cluster_file.read_text())["controller"]["state"]["pid"]
    proc = psutil.Process(pid)
    schedulers = proc.children(recursive=True)
    proc.kill()
    for child in schedulers:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _kill_external(cluster_file: Path) -> None:
    """The whole external cluster goes down at once (its host died)."""
    kill_cluster_pids(pids_in_cluster_file(cluster_file))


def test_attached_server_reports_a_lost_cluster_and_reconnects_when_it_is_back(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "external-profile"
    cluster_file = start_external_cluster(profile)
    files = [cluster_file]
    server = ServerProcess(tmp_path / "data", engines=2, extra_args=["--attach", str(cluster_file)])
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            running = submit(tasks, "demo.sleep", args={"seconds": 60})
            wait_state(tasks, running.name, {tpb.TASK_STATE_RUNNING})
            assert json.loads(cluster_file.read_text())["cluster"]["cluster_id"] == "external"

            _kill_hub(cluster_file)
            wait_until(lambda: health(channel) == NOT_SERVING, 20, "NOT_SERVING")
            ended = wait_terminal(tasks, running.name, timeout=20)
            assert (ended.state, ended.error.reason) == (tpb.TASK_STATE_FAILED, "CLUSTER_LOST")
            queued = submit(tasks, "demo.echo", args={"value": "back"})
            _kill_external(cluster_file)  # its orphaned engines too, before it comes back

            # The operator brings the cluster back (after clearing the dead hub's connection
            # files, which a new ipcontroller would otherwise hand to its engines).
            for stale in (profile / "security").glob("*external*"):
                stale.unlink()
            files.append(start_external_cluster(profile))
            wait_until(lambda: health(channel) == SERVING, 60, "SERVING after reconnecting")
            done = wait_terminal(tasks, queued.name, timeout=60)
            assert done.state == tpb.TASK_STATE_SUCCEEDED
    finally:
        try:
            server.stop()
        finally:
            server.kill_leftovers()
            for path in files:
                _kill_external(path)
            kill_external_cluster(profile)
