"""The DNS-rebinding guard of the HTTP side: which ``Host`` headers it answers.

With auth off (no ``--auth-tokens``) every caller is an admin, and the HTTP side's only
protection is where it listens (127.0.0.1 by default). A web page on another site can
still reach it: it rebinds its own DNS name to 127.0.0.1, and the browser then treats
the gateway as that page's origin, so the page may submit and interrupt tasks and read
/metrics. What gives it away is the ``Host`` header, which carries the page's name.

So with auth off a request is answered only when its ``Host`` is
- an IP address (``127.0.0.1:50052``, ``[::1]:50052``, ``10.0.0.7``): a page cannot
  rebind an address;
- ``localhost`` or a name under ``.localhost`` (RFC 6761: browsers resolve them to
  loopback themselves);
- this machine's host name (``socket.gethostname()``, and its first label);
- a name the operator allowed (``--http-allowed-host``, e.g. the name a reverse proxy
  forwards);
- absent (an HTTP/1.0 client; browsers always send it).

With auth on, a rebinding page has no token (the dashboard keeps its token for its own
origin), so every ``Host`` is answered. The probes are answered whatever the ``Host``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["HostGuard", "host_name"]


def host_name(header: str) -> str:
    """The name in a ``Host`` header: no port, no brackets, lower case, no final dot."""
    text = header.strip().lower()
    if text.startswith("["):  # [v6]:port
        return text[1 : text.find("]")] if "]" in text else text[1:]
    name, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in name:  # not a bare IPv6 address
        text = name
    return text.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """Says whether a request's ``Host`` may be answered (see the module docstring)."""

    def __init__(self, allowed: Iterable[str] = (), *, machine: str | None = None) -> None:
        machine = socket.gethostname() if machine is None else machine
        names = {host_name(n) for n in allowed if n.strip()}
        if machine:
            own = host_name(machine)
            names |= {own, own.split(".")[0]}
        self.names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        if not header:
            return True
        name = host_name(header)
        return (
            _is_address(name)
            or name == "localhost"
            or name.endswith(".localhost")
            or name in self.names
        )
