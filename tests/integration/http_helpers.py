"""Helpers for the HTTP side's tests: a server with ``--http``, scraping, the gateway.

Plain ``urllib`` on purpose: the tests speak HTTP the way a probe, Prometheus or a
browser does, with nothing of the server's own code on the client side.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from tests.support import FAST_SERVER_ARGS, ServerProcess, free_port


def http_server(data_dir: Any, *extra: str, engines: int = 2) -> tuple[ServerProcess, str]:
    """A started ServerProcess with the HTTP side on a free port, and its base URL."""
    port = free_port()
    proc = ServerProcess(
        data_dir,
        engines=engines,
        extra_args=[*FAST_SERVER_ARGS, "--http", f"127.0.0.1:{port}", *extra],
    )
    proc.start()
    return proc, f"http://127.0.0.1:{port}"


def serve_http(data_dir: Any, *extra: str, engines: int = 2) -> Iterator[tuple[ServerProcess, str]]:
    """A fixture body: :func:`http_server`'s server and base URL, stopped after."""
    proc, base = http_server(data_dir, *extra, engines=engines)
    try:
        yield proc, base
    finally:
        proc.stop()
        proc.kill_leftovers()


def _headers(request: urllib.request.Request, token: str, host: str) -> None:
    """The bearer ``token`` and, instead of the URL's, the name ``host`` (URL's port kept)."""
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if host:
        request.add_header("Host", f"{host}:{urlsplit(request.full_url).port}")


def get(url: str, token: str = "", host: str = "") -> tuple[int, dict[str, str], bytes]:
    """GET ``url``; (status, headers, body), error statuses included."""
    request = urllib.request.Request(url)
    _headers(request, token, host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def call(
    base: str, method: str, body: dict[str, Any], token: str = "", host: str = ""
) -> tuple[int, Any]:
    """One unary RPC through the gateway, e.g. call(base, "TaskService/GetTask", {...})."""
    request = urllib.request.Request(
        f"{base}/tether.v1.{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    _headers(request, token, host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def stream(
    base: str, method: str, body: dict[str, Any], token: str = "", timeout: float = 60
) -> Iterator[tuple[int, Any]]:
    """A server-streaming RPC through the gateway: (flags, message) per Connect envelope."""
    payload = json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/tether.v1.{method}",
        data=struct.pack(">BI", 0, len(payload)) + payload,
        headers={"Content-Type": "application/connect+json"},
        method="POST",
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["Content-Type"] == "application/connect+json"
        while True:
            head = response.read(5)
            if len(head) < 5:
                return
            flags, length = struct.unpack(">BI", head)
            yield flags, json.loads(response.read(length))
            if flags & 0x02:
                return


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str, token: str = "", path: str = "/metrics") -> Samples:
    """/metrics parsed with prometheus_client's own parser: {(name, labels): value}."""
    status, headers, body = get(base + path, token)
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def error_reason(error: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the ErrorInfo in a Connect error."""
    for detail in error.get("details", []):
        if detail["type"] == "google.rpc.ErrorInfo":
            debug = detail["debug"]
            assert debug["domain"] == "tether.dev"
            return debug["reason"], debug.get("metadata", {})
    raise AssertionError(f"no ErrorInfo in {error}")
