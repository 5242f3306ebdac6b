"""The HTTP side of tether-server, on the same asyncio loop as grpc.aio (no extra process).

Routes on ``--http`` (default: the gRPC host, port + 1):

=========================  ==================================================================
``GET /``                  the dashboard (static HTML + compiled TypeScript under ``static/``)
``POST /tether.v1.*/*``    the tether.v1 RPCs in the Connect protocol (``gateway.py``)
``GET /metrics``           Prometheus text format; with ``--auth-tokens`` it needs a bearer
                           token, unless ``--metrics-listen`` moves it to its own address
``GET /healthz``           liveness: 200 while the process answers; body has the gRPC health
``GET /readyz``            readiness: 200 when gRPC health says SERVING, 503 otherwise
=========================  ==================================================================

With auth off, the main address answers only requests whose ``Host`` is an address,
``localhost`` or a known name (``hosts.py``, the DNS-rebinding guard); others get 403
(``HOST_NOT_ALLOWED``), the probes excepted.

Both probes take ``?service=tether.v1.TaskService`` like ``grpc.health.v1.Health/Check``
(an unknown service is 404, as gRPC's NOT_FOUND). The access log (``tether_server.http``,
INFO) writes the request line and status only: never a header, so never a token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..api.auth import Authenticator
from ..core.errors import TetherError
from .gateway import MAX_REQUEST_BYTES, Gateway, GatewayContext, error_response, gateway_error
from .hosts import HostGuard, host_name

log = logging.getLogger("tether_server.http")

STATIC = Path(__file__).parent / "static"

Health = Callable[[str], str | None]
"""Health of a service ("" for the server): "SERVING", "NOT_SERVING", or None if unknown."""

_SECURITY_HEADERS = {
    # The dashboard loads only its own files: no inline script, no third party.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8080`` for IPv6) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not an address: {address!r} (try 127.0.0.1:50052)")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpSide:
    """The aiohttp applications (main, and metrics when it has its own address)."""

    def __init__(
        self,
        *,
        gateway: Gateway,
        auth: Authenticator,
        registry: CollectorRegistry,
        health: Health,
        listen: str,
        metrics_listen: str = "",
        problem: Callable[[], str] = lambda: "",
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.gateway = gateway
        self.problem = problem
        """Why the server is not ready, in words (the controller's ``problem``)."""
        self.auth = auth
        self.registry = registry
        self.health = health
        self.listen = listen
        self.metrics_listen = metrics_listen
        self.host_guard = None if auth.enabled else HostGuard(allowed_hosts)
        """The DNS-rebinding guard of the main address; None with auth on (tokens protect)."""
        self._refused_hosts: set[str] = set()
        """Names already logged as refused (at most 100: one warning per name)."""
        self._probes = {"/healthz": self._healthz, "/readyz": self._readyz}
        """Routes every address serves, whatever the ``Host`` (the Host check passes them)."""
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.metrics_port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        main = self._app(dashboard=True, metrics=not self.metrics_listen, protect_metrics=True)
        self.port = await self._serve(main, self.listen)
        if self.metrics_listen:
            side = self._app(dashboard=False, metrics=True, protect_metrics=False)
            self.metrics_port = await self._serve(side, self.metrics_listen)

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    async def _serve(self, app: web.Application, address: str) -> int:
        host, port = split_address(address)
        runner = web.AppRunner(
            app,
            access_log=log,
            access_log_format="%r %s %Tfs",
            handler_cancellation=True,  # a closed browser tab ends its stream at once
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runners.append(runner)
        server = site._server  # aiohttp keeps the bound sockets there
        sockets = getattr(server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    def url(self) -> str:
        """The dashboard's address, as the banner prints it."""
        return _http_url(self.listen, self.port) + "/"

    def metrics_url(self) -> str:
        if not self.metrics_listen:
            return self.url() + "metrics"
        return _http_url(self.metrics_listen, self.metrics_port) + "/metrics"

    # ------------------------------------------------------------------ routes
    def _app(self, *, dashboard: bool, metrics: bool, protect_metrics: bool) -> web.Application:
        middlewares: list[Middleware] = [_security_headers]
        if dashboard and self.host_guard is not None:
            middlewares.append(self._host_check(self.host_guard))
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=middlewares)
        for path, probe in self._probes.items():
            app.router.add_get(path, probe)
        if metrics:
            app.router.add_get("/metrics", self._metrics_handler(protect_metrics))
        if dashboard:
            self.gateway.add_routes(app)
            app.router.add_get("/", self._index)
            app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        return app

    def _host_check(self, guard: HostGuard) -> Middleware:
        """The middleware that refuses a ``Host`` the guard does not allow (probes pass)."""

        @web.middleware
        async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
            host = request.headers.get("Host")
            if request.path in self._probes or guard.allows(host):
                return await handler(request)
            name = host_name(host or "")
            if name not in self._refused_hosts and len(self._refused_hosts) < 100:
                self._refused_hosts.add(name)
                log.warning(
                    "refused HTTP requests for Host %r (auth is off: a DNS-rebinding guard); "
                    "allow it with --http-allowed-host %s",
                    name,
                    name,
                )
            message = (
                f"Host {name!r} is not served without --auth-tokens (a guard against DNS "
                "rebinding): use an IP address or localhost, or start the server with "
                f"--http-allowed-host {name}"
            )
            if self.gateway.serves(request.path):
                return error_response(
                    gateway_error("permission_denied", message, "HOST_NOT_ALLOWED")
                )
            return web.Response(status=403, text=message + "\n")

        return check_host

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def _probe(self, request: web.Request) -> tuple[str, str | None]:
        service = request.query.get("service", "")
        return service, self.health(service)

    async def _healthz(self, request: web.Request) -> web.Response:
        service, status = self._probe(request)
        if status is None:
            return web.json_response({"status": "SERVICE_UNKNOWN", "service": service}, status=404)
        return web.json_response({"status": status, "service": service, "live": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        service, status = self._probe(request)
        if status is None:
            return web.json_response({"status": "SERVICE_UNKNOWN", "service": service}, status=404)
        if status == "SERVING":
            return web.json_response({"status": status, "service": service})
        body = {"status": status, "service": service, "problem": self.problem()}
        return web.json_response(body, status=503)

    def _metrics_handler(self, protect: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def metrics(request: web.Request) -> web.Response:
            if protect and self.auth.enabled:
                try:
                    self.auth.authenticate(GatewayContext(request.headers.get("Authorization", "")))
                except TetherError as exc:
                    return web.Response(
                        status=401,
                        text=exc.message + "\n",
                        headers={"WWW-Authenticate": 'Bearer realm="tether"'},
                    )
            started = time.perf_counter()
            body = generate_latest(self.registry)
            log.debug("metrics generated in %.4fs", time.perf_counter() - started)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        return metrics


def _http_url(address: str, port: int) -> str:
    host, _ = split_address(address)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:  # streams sent their headers already; they are not HTML
        response.headers.update(_SECURITY_HEADERS)
        if request.path != "/" and not request.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
    return response
