"""Fixtures for integration tests: one real server (with a real local cluster)
shared by the session, and helpers to talk to it with the generated stubs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support import ServerProcess, serve_for_tests
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc

FAST_GRACE = ["--grace-sigint", "0.5s", "--grace-sigterm", "0.5s", "--grace-sigkill", "5s"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_for_tests(tmp_path_factory, "shared-server")


@pytest.fixture(scope="session")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def tasks(channel: grpc.Channel) -> task_service_pb2_grpc.TaskServiceStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture(scope="session")
def cluster(channel: grpc.Channel) -> cluster_service_pb2_grpc.ClusterServiceStub:
    return cluster_service_pb2_grpc.ClusterServiceStub(channel)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
