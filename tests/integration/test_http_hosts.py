"""The DNS-rebinding guard on a real server with auth off (``web/hosts.py``).

A page that rebinds its own name to 127.0.0.1 reaches the HTTP side as same-origin, but
its requests carry its name in ``Host``. With auth off they are refused (403,
``HOST_NOT_ALLOWED``) and nothing they asked for happens; IP addresses, localhost and
the names given with ``--http-allowed-host`` are answered, and so are the probes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ServerProcess

from .http_helpers import call, error_reason, get, serve_http

EVIL = "rebound.example"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    data = tmp_path_factory.mktemp("http-hosts") / "data"
    yield from serve_http(data, "--http-allowed-host", "Dash.Internal", engines=1)


@pytest.fixture(scope="module")
def base(served: tuple[ServerProcess, str]) -> str:
    return served[1]


def listed(base: str) -> list[dict[str, Any]]:
    status, answer = call(base, "TaskService/ListTasks", {})
    assert status == 200, answer
    return list(answer.get("tasks", []))


def test_a_rebound_name_is_refused_and_its_submission_never_exists(base: str) -> None:
    before = len(listed(base))
    submit = {"task": "demo.echo", "args": {"value": "from a rebound page"}}
    status, error = call(base, "TaskService/SubmitTask", submit, host=EVIL)
    assert status == 403
    assert error["code"] == "permission_denied"
    assert "--http-allowed-host rebound.example" in error["message"]
    assert error_reason(error)[0] == "HOST_NOT_ALLOWED"
    assert len(listed(base)) == before  # nothing refused was created, so nothing runs


@pytest.mark.parametrize("path", ["/", "/metrics", "/static/js/main.js"])
def test_the_page_and_the_metrics_are_refused_to_a_rebound_name(base: str, path: str) -> None:
    status, _, body = get(base + path, host=EVIL)
    assert status == 403
    assert b"DNS rebinding" in body


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_probes_answer_any_host(base: str, path: str) -> None:
    assert get(base + path, host=EVIL)[0] == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "dash.internal"])
def test_addresses_localhost_and_allowed_names_are_served(base: str, host: str) -> None:
    assert get(base + "/", host=host)[0] == 200
    status, answer = call(base, "ClusterService/GetCluster", {}, host=host)
    assert status == 200, answer
    assert "demo.echo" in answer["registeredTasks"]
