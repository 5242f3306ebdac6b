"""The interrupt storm with short tasks only, so that most travel several to a request
(``--pipeline-depth`` 8, the default): still nothing lost, no engine killed, no task
touched by an interrupt meant for another."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ServerProcess

from .helpers import wait_pool
from .http_helpers import scrape, serve_http, value
from .test_storm import storm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    yield from serve_http(tmp_path_factory.mktemp("batch-storm") / "data", engines=2)


@pytest.fixture(scope="module")
def server(served: tuple[ServerProcess, str]) -> ServerProcess:
    return served[0]


def test_a_storm_of_batched_tasks_loses_nothing_and_hits_only_its_targets(
    tasks: Any, cluster: Any, served: tuple[ServerProcess, str]
) -> None:
    wait_pool(cluster, 2)
    storm(tasks, cluster, [0.0, 0.001, 0.003, 0.01], 500, threads=32)
    samples = scrape(served[1])
    requests = value(samples, "tether_task_requests_total")
    attempts = value(samples, "tether_task_request_attempts_total")
    print(f"{attempts} attempts in {requests} requests")
    assert attempts - requests >= 50, (attempts, requests)  # many went several to a request
