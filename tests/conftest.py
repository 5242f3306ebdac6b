"""Fixtures every suite shares: gRPC stubs for the ``server`` a test module sees.

``server`` itself comes from nearer: integration's conftest starts one for the whole
session, and a module that needs its own flags (the LLM, preemption, HTTP and
multi-host modules) defines its own, which these stubs then talk to. Module-scoped, so
they follow either.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support import ServerProcess
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def tasks(channel: grpc.Channel) -> task_service_pb2_grpc.TaskServiceStub:
    return task_service_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture(scope="module")
def cluster(channel: grpc.Channel) -> cluster_service_pb2_grpc.ClusterServiceStub:
    return cluster_service_pb2_grpc.ClusterServiceStub(channel)
