"""Flags of what the server listens on and who may call it: gRPC, TLS, tokens, HTTP."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..web import split_address

__all__ = ["add_flags", "check", "http_address"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving", "gRPC and HTTP addresses, TLS and bearer tokens")
    group.add_argument(
        "--listen", default="127.0.0.1:50051", help="address to listen on (default %(default)s)"
    )
    group.add_argument(
        "--auth-tokens",
        type=Path,
        default=os.environ.get("TETHER_AUTH_TOKENS_FILE") or None,
        help="bearer tokens file, 'TOKEN PRINCIPAL [admin]' per line (default $TETHER_AUTH_TOKENS_FILE; none: auth off)",
    )
    group.add_argument(
        "--tls-cert", type=Path, default=None, help="serve TLS with this certificate chain (PEM)"
    )
    group.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert (PEM)")
    group.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (mutual TLS)",
    )
    group.add_argument(
        "--http",
        default=None,
        metavar="ADDR",
        help="serve the dashboard, /metrics, /healthz and /readyz here (default: the --listen host, its port + 1)",
    )
    group.add_argument("--no-http", action="store_true", help="serve no HTTP at all")
    group.add_argument(
        "--http-allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="with auth off, also answer HTTP requests for this Host name (repeatable); "
        "by default only IP addresses, localhost and this machine's name are answered "
        "(a guard against DNS rebinding)",
    )
    group.add_argument(
        "--metrics-listen",
        default="",
        metavar="ADDR",
        help="serve /metrics (and the probes) on this address instead, without a token (e.g. an internal interface)",
    )


def check(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """TLS flags that go together."""
    if bool(a.tls_cert) != bool(a.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")


def http_address(parser: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """Where the HTTP side listens ("": nowhere), both HTTP addresses checked."""
    try:
        http_listen = "" if a.no_http else (a.http or _next_port(a.listen))
        for address in (http_listen, a.metrics_listen):
            if address:
                split_address(address)
    except ValueError as exc:
        parser.error(str(exc))
    if a.metrics_listen and not http_listen:
        parser.error("--metrics-listen needs the HTTP side (drop --no-http)")
    return http_listen


def _next_port(listen: str) -> str:
    """The default HTTP address: the gRPC host, the next port (0 stays 0: any free port)."""
    host, port = split_address(listen)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + 1 if port else 0}"
