"""Fixtures for integration tests: one real server (with a real local cluster)
shared by the session. The stubs that talk to it (``channel``, ``tasks``, ``cluster``)
are in tests/conftest.py; a module that defines its own ``server`` gets stubs for that one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, serve_for_tests


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_for_tests(tmp_path_factory, "shared-server")


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
