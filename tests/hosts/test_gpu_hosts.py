"""GPU placement on an engine host: one engine per GPU, pinned and tagged by default.

The host has no GPU: a fake ``nvidia-smi`` (netns.fake_nvidia_smi, 2 GPUs of 80 GiB)
comes first on the PATH of its ssh sessions, so tether's probe and the engines' load
reports both see it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from tests.integration.helpers import running_server_with_env, submit, wait_terminal
from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb

from .netns import TestHost, fake_nvidia_smi, namespaced_hosts
from .test_remote_engines import remote_pythonpath

GiB = 1024**3


@pytest.fixture(scope="module")
def gpu_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHost]:
    fake = fake_nvidia_smi(tmp_path_factory.mktemp("fake-gpu"), gpus=2)
    with namespaced_hosts(["g1"], {"g1": str(fake)}) as made:
        yield made[0]


@pytest.fixture(scope="module")
def server(gpu_host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("gpu")
    hosts_file = base / "hosts.toml"
    # No engine count: one per GPU.
    hosts_file.write_text(f'[hosts.g1]\nssh = "{gpu_host.location}"\n')
    extra = [
        *FAST_SERVER_ARGS,
        "--engines", "0",
        "--hosts-file", str(hosts_file),
        "--cluster-ip", gpu_host.root_address,
        "--ssh-key", str(gpu_host.client_key),
        "--remote-env", f"PYTHONPATH={remote_pythonpath()}",
        "--load-interval", "1s",
        "--no-http",
        "--ssh-option", "StrictHostKeyChecking=no",
        "--ssh-option", "UserKnownHostsFile=/dev/null",
    ]  # fmt: skip
    with running_server_with_env(base / "data", {}, engines=0, extra_args=extra) as proc:
        yield proc


def _idle(channel: grpc.Channel, n: int, timeout: float = 90.0) -> list[cpb.Engine]:
    stub = cluster_service_pb2_grpc.ClusterServiceStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        engines = stub.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
        idle = [e for e in engines if e.state == cpb.ENGINE_STATE_IDLE]
        if len(idle) >= n:
            return sorted(idle, key=lambda e: list(e.tags))
        assert time.monotonic() < deadline, list(engines)
        time.sleep(0.1)


def test_one_engine_per_gpu_pinned_and_tagged(server: ServerProcess, gpu_host: TestHost) -> None:
    with grpc.insecure_channel(server.address) as channel:
        engines = _idle(channel, 2)
        reply = cluster_service_pb2_grpc.ClusterServiceStub(channel).GetCluster(
            cpb.GetClusterRequest(), timeout=10
        )
        assert reply.target_size == 2
        tags = sorted(tuple(sorted(e.tags)) for e in engines)
        assert tags == [("gpu", "gpu:0"), ("gpu", "gpu:1")]
        for engine in engines:
            index = next(t for t in engine.tags if t.startswith("gpu:")).split(":")[1]
            environ = gpu_host.run(f"tr '\\0' '\\n' < /proc/{engine.pid}/environ").stdout
            assert f"CUDA_VISIBLE_DEVICES={index}" in environ.splitlines()


def test_a_task_asking_for_one_gpu_lands_on_its_engine(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        engines = _idle(channel, 2)
        wanted = next(e for e in engines if "gpu:1" in e.tags)
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        for _ in range(3):
            task = submit(tasks, "demo.echo", args={"value": 1}, required_tags=["gpu:1"])
            done = wait_terminal(tasks, task.name, timeout=30)
            assert done.state == tpb.TASK_STATE_SUCCEEDED
            assert done.engine_id == wanted.id


def test_gpu_memory_of_each_engines_gpu_is_in_its_load(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        _idle(channel, 2)
        stub = cluster_service_pb2_grpc.ClusterServiceStub(channel)
        deadline = time.monotonic() + 15
        while True:
            engines = stub.GetCluster(cpb.GetClusterRequest(), timeout=10).engines
            loaded = [e for e in engines if e.HasField("load") and e.load.gpu_memory_total_bytes]
            if len(loaded) >= 2:
                break
            assert time.monotonic() < deadline, list(engines)
            time.sleep(0.2)
        for engine in loaded:  # one GPU each: 1 GiB of 80 GiB
            assert engine.load.gpu_memory_total_bytes == 80 * GiB
            assert engine.load.gpu_memory_used_bytes == 1 * GiB


def test_a_gpu_this_host_does_not_have_is_refused_at_submit(server: ServerProcess) -> None:
    from tests.integration.helpers import error_info

    with grpc.insecure_channel(server.address) as channel:
        _idle(channel, 2)
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            submit(tasks, "demo.echo", args={"value": 1}, required_tags=["gpu:7"])
        code, reason, metadata, _ = error_info(caught.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "UNSCHEDULABLE")
        assert "gpu:1" in metadata["engine_tags"].split(",")
