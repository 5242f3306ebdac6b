"""The DNS-rebinding guard on a real server with auth off (``web/hosts.py``).

A page that rebinds its own name to 127.0.0.1 reaches the HTTP side as same-origin, but
its requests carry its name in ``Host``. With auth off they are refused (403,
``HOST_NOT_ALLOWED``) and nothing they asked for happens; IP addresses, localhost and
the names given with ``--http-allowed-host`` are answered, and so are the probes.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import ServerProcess

from .http_helpers import error_reason, serve_http

EVIL = "rebound.example"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    data = tmp_path_factory.mktemp("http-hosts") / "data"
    yield from serve_http(data, "--http-allowed-host", "Dash.Internal", engines=1)


@pytest.fixture(scope="module")
def base(served: tuple[ServerProcess, str]) -> str:
    return served[1]


def send(base: str, path: str, host: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """GET (or POST ``body`` as Connect JSON) ``path`` with this ``Host`` header."""
    port = urlsplit(base).port
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Host": f"{host}:{port}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def listed(base: str) -> list[dict[str, Any]]:
    status, body = send(base, "/tether.v1.TaskService/ListTasks", "127.0.0.1", {})
    assert status == 200, body
    return list(json.loads(body).get("tasks", []))


def test_a_rebound_name_is_refused_and_its_submission_never_exists(base: str) -> None:
    before = len(listed(base))
    submit = {"task": "demo.echo", "args": {"value": "from a rebound page"}}
    status, body = send(base, "/tether.v1.TaskService/SubmitTask", EVIL, submit)
    assert status == 403
    error = json.loads(body)
    assert error["code"] == "permission_denied"
    assert "--http-allowed-host rebound.example" in error["message"]
    assert error_reason(error)[0] == "HOST_NOT_ALLOWED"
    assert len(listed(base)) == before  # nothing refused was created, so nothing runs


@pytest.mark.parametrize("path", ["/", "/metrics", "/static/js/main.js"])
def test_the_page_and_the_metrics_are_refused_to_a_rebound_name(base: str, path: str) -> None:
    status, body = send(base, path, EVIL)
    assert status == 403
    assert b"DNS rebinding" in body


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_probes_answer_any_host(base: str, path: str) -> None:
    assert send(base, path, EVIL)[0] == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "dash.internal"])
def test_addresses_localhost_and_allowed_names_are_served(base: str, host: str) -> None:
    assert send(base, "/", host)[0] == 200
    status, body = send(base, "/tether.v1.ClusterService/GetCluster", host, {})
    assert status == 200, body
    assert "demo.echo" in json.loads(body)["registeredTasks"]
