"""Bearer tokens, task ownership, and TLS."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support import ServerProcess, open_channel
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .helpers import error_info, struct, wait_state

TOKENS = """
# token       principal  role
alice-token   alice
bob-token     bob
root-token    root       admin
"""


def _as(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("auth")
    tokens = base / "tokens"
    tokens.write_text(TOKENS)
    with ServerProcess(base / "data", engines=1, extra_args=["--auth-tokens", str(tokens)]) as proc:
        yield proc


def test_calls_without_or_with_an_unknown_token_are_unauthenticated(
    auth_server: ServerProcess,
) -> None:
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        for metadata in (None, _as("nope"), [("authorization", "Basic abc")]):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListTasks(spb.ListTasksRequest(), metadata=metadata, timeout=10)
            code, reason, _, _ = error_info(caught.value)
            assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
        with pytest.raises(grpc.RpcError) as caught:
            cluster_service_pb2_grpc.ClusterServiceStub(ch).GetCluster(
                cpb.GetClusterRequest(), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tasks_record_their_owner_and_only_the_owner_or_an_admin_may_interrupt(
    auth_server: ServerProcess,
) -> None:
    with grpc.insecure_channel(auth_server.address) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        req = spb.SubmitTaskRequest(task="demo.sleep", args=struct({"seconds": 60}))
        task = stub.SubmitTask(req, metadata=_as("alice-token"), timeout=10).task
        assert task.owner == "alice"
        with pytest.raises(grpc.RpcError) as caught:
            stub.InterruptTask(
                spb.InterruptTaskRequest(name=task.name), metadata=_as("bob-token"), timeout=10
            )
        code, reason, metadata, _ = error_info(caught.value)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert metadata["owner"] == "alice"
        answer = stub.InterruptTask(
            spb.InterruptTaskRequest(name=task.name, reason="admin"),
            metadata=_as("root-token"),
            timeout=10,
        ).task
        assert answer.state in (tpb.TASK_STATE_CANCELLED, tpb.TASK_STATE_INTERRUPTING)
        assert answer.interrupt.requested_by == "root"


def test_health_stays_open_for_probes(auth_server: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(auth_server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_server_serves_tls_clients_and_refuses_plaintext(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    root = cert.read_bytes()
    extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with ServerProcess(tmp_path / "data", engines=1, extra_args=extra, root_cert=root) as server:
        with open_channel(server.address, root) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            req = spb.SubmitTaskRequest(task="demo.echo", args=struct({"value": "secret"}))
            task = stub.SubmitTask(req, timeout=10).task
            assert (
                wait_state(stub, task.name, {tpb.TASK_STATE_SUCCEEDED}).result.string_value
                == "secret"
            )
        with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError):
            task_service_pb2_grpc.TaskServiceStub(plain).ListTasks(
                spb.ListTasksRequest(), timeout=5
            )


def test_streams_per_principal_are_limited_with_resource_exhausted(tmp_path: Path) -> None:
    extra = ["--max-streams-per-principal", "2"]
    server = ServerProcess(tmp_path / "data", engines=1, extra_args=extra)
    with server, grpc.insecure_channel(server.address) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        open_streams = [
            stub.StreamTaskStatus(spb.StreamTaskStatusRequest(send_initial_state=True))
            for _ in range(2)
        ]
        for call in open_streams:
            next(iter(call))  # each is registered once its first message arrives
        with pytest.raises(grpc.RpcError) as caught:
            next(
                iter(
                    stub.StreamTaskStatus(
                        spb.StreamTaskStatusRequest(send_initial_state=True), timeout=10
                    )
                )
            )
        code, reason, metadata, _ = error_info(caught.value)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED")
        assert metadata["principal"] == "anonymous"
        for call in open_streams:
            call.cancel()
