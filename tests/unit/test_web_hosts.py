"""The HTTP side's DNS-rebinding guard (``web/hosts.py``): which Host headers it answers."""

from __future__ import annotations

import pytest

from tether_server.web.hosts import HostGuard, host_name


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:50052", "127.0.0.1"),
        ("[::1]:50052", "::1"),
        ("[::1]", "::1"),
        ("LocalHost:8080", "localhost"),
        ("dash.example.", "dash.example"),
        ("dash.example:443", "dash.example"),
        (" gpu-3 ", "gpu-3"),
    ],
)
def test_the_name_of_a_host_header_has_no_port_brackets_case_or_final_dot(
    header: str, name: str
) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    "header",
    [
        "127.0.0.1:50052",
        "10.1.2.3",
        "[::1]:50052",
        "[fe80::1]",
        "localhost:50052",
        "app.localhost",
        "gpu-3:50052",
        "gpu-3.lab.example",
        "GPU-3.lab.example.",
        "dash.internal:8443",
        "",
        None,
    ],
)
def test_addresses_localhost_this_machine_and_allowed_names_are_answered(
    header: str | None,
) -> None:
    guard = HostGuard(["dash.internal"], machine="gpu-3.lab.example")
    assert guard.allows(header)


@pytest.mark.parametrize(
    "header",
    ["evil.example", "evil.example:50052", "127.0.0.1.evil.example", "localhost.evil.example",
     "gpu-3.evil.example", "dash.internal.evil.example"],
)  # fmt: skip
def test_other_names_are_refused(header: str) -> None:
    guard = HostGuard(["dash.internal"], machine="gpu-3.lab.example")
    assert not guard.allows(header)


def test_an_empty_allowed_name_allows_nothing_more() -> None:
    guard = HostGuard(["", " "], machine="")
    assert guard.names == frozenset()
    assert not guard.allows("evil.example")
