"""Attached mode across hosts: an operator's cluster with engines on the namespaced hosts
(ipyparallel's own SSH launcher, no tether code in it), and a tether that restarts.

The cluster outlives the tether server that was attached to it; the next server finds
the task that was still running on a remote engine through the hub's records and
delivers its result (``reattach.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import TaskStream, get, submit, wait_state, wait_terminal
from tests.integration.test_attached import CLUSTER_TAG, kill_external_cluster
from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .netns import TestHost
from .test_remote_engines import remote_pythonpath

_START = """
import json, logging, sys, ipyparallel as ipp
from traitlets.config import Config
profile, ip, engines, ssh_args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
c = Config()
c.SSHEngineSetLauncher.engines = engines
c.SSHEngineSetLauncher.ssh_args = ssh_args
c.SSHEngineSetLauncher.scp_args = ssh_args
c.SSHEngineSetLauncher.remote_python = sys.executable
cluster = ipp.Cluster(config=c, engine_launcher_class="ssh", n=len(engines), profile_dir=profile,
                      cluster_id="external-ssh", controller_ip=ip,
                      controller_args=["--HeartMonitor.period=500"], delay=0,
                      shutdown_atexit=False, log_level=logging.WARNING)
cluster.start_cluster_sync()
print(cluster.cluster_file, flush=True)
"""


@pytest.fixture()
def ssh_cluster(hosts: list[TestHost], tmp_path: Path) -> Iterator[Path]:
    """An ipyparallel cluster of the operator's: its hub here, one engine on each host."""
    profile = tmp_path / "external-ssh-profile"
    environment = {"PYTHONPATH": remote_pythonpath(), CLUSTER_TAG: str(profile)}
    engines = {f"root@{h.address}": {"n": 1, "environment": environment} for h in hosts}
    ssh_args = ["-i", str(hosts[0].client_key), "-o", "BatchMode=yes"]
    for option in ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"):
        ssh_args += ["-o", option]
    args = [str(profile), hosts[0].root_address, json.dumps(engines), json.dumps(ssh_args)]
    log = tmp_path / "external-ssh.log"
    with log.open("w") as err:
        # Not subprocess.run: the launcher's ssh processes keep the pipes open for good.
        starter = subprocess.Popen(
            [sys.executable, "-c", _START, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, CLUSTER_TAG: str(profile)},
        )
    try:
        assert starter.stdout is not None
        line = starter.stdout.readline().strip()
        assert starter.wait(timeout=120) == 0, log.read_text()
        yield Path(line)
    finally:
        with contextlib.suppress(Exception):
            starter.kill()
        # Hub, schedulers, the launcher's ssh processes and the engines on the hosts all
        # carry the tag (the engines through the launcher's environment).
        kill_external_cluster(profile)


def _is_engine_on(host: TestHost, pid: int) -> bool:
    done = host.run(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
    return done.returncode == 0 and "ipyparallel" in done.stdout


def test_a_restarted_server_delivers_the_result_of_a_task_still_running_on_a_remote_host(
    hosts: list[TestHost], ssh_cluster: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    attach = [*FAST_SERVER_ARGS, "--attach", str(ssh_cluster), "--no-http"]
    first = ServerProcess(data, engines=2, extra_args=attach)
    # In a with block: a failing assertion must not leave the first server running.
    with first, grpc.insecure_channel(first.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        cluster = cluster_service_pb2_grpc.ClusterServiceStub(ch)
        task = submit(tasks, "demo.count", args={"n": 100, "interval": 0.1})  # 10 s
        TaskStream(tasks, task.name).wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_PROGRESS)
        engine_id = wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING}).engine_id
        engines = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        pid = next(e.pid for e in engines if e.id == engine_id)
        # The engine is a process of one of the hosts (its pid is one of that PID namespace).
        assert any(_is_engine_on(h, pid) for h in hosts)
        first.kill()
    second = ServerProcess(data, port=first.port, engines=2, extra_args=attach)
    with second, grpc.insecure_channel(second.address) as ch:
        tasks = task_service_pb2_grpc.TaskServiceStub(ch)
        done = wait_terminal(tasks, task.name, timeout=60)
        assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
        whole = get(tasks, task.name)
        assert (whole.attempt, whole.engine_id, whole.result.number_value) == (1, engine_id, 100)
        assert whole.output.endswith("step 100\n")
