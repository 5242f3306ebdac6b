"""Fixtures of the multi-host suite: two namespaced hosts with a real sshd (netns.py)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support import ServerProcess
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc

from .netns import TestHost, namespaced_hosts


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[TestHost]]:
    """Hosts ``h2`` and ``h3``, made for the module's tests and removed after them."""
    with namespaced_hosts(["h2", "h3"]) as made:
        yield made


# A module defines its own ``server`` fixture (the hosts and flags it tests); these talk to it.
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
