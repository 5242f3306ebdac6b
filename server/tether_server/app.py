"""The tether-server process: gRPC server, health, reflection, the HTTP side, signals.

The flags and the configuration they make live in :mod:`tether_server.flags`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.v1 import cluster_service_pb2, task_service_pb2

from . import web
from .api import ClusterService, TaskService
from .api.auth import Authenticator
from .api.reflection import documented_pool
from .config import ServerConfig
from .controller import Controller
from .flags import parse_args
from .logformat import EventLogger, configure
from .runtime import registry
from .tasks import llm_catalog
from .web import HttpSide

log = logging.getLogger("tether_server")

TASK_SERVICE = "tether.v1.TaskService"
CLUSTER_SERVICE = "tether.v1.ClusterService"


def _passthrough(message: Any) -> bytes:
    """Stream responses may come pre-serialized (one serialization shared by all subscribers)."""
    if isinstance(message, bytes):
        return message
    return bytes(message.SerializeToString())


def _handlers(tasks: TaskService, cluster: ClusterService) -> list[grpc.GenericRpcHandler]:
    s = task_service_pb2
    c = cluster_service_pb2

    def unary(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    task_handler = grpc.method_handlers_generic_handler(
        TASK_SERVICE,
        {
            "SubmitTask": unary(tasks.SubmitTask, s.SubmitTaskRequest, s.SubmitTaskResponse),
            "InterruptTask": unary(
                tasks.InterruptTask, s.InterruptTaskRequest, s.InterruptTaskResponse
            ),
            "GetTask": unary(tasks.GetTask, s.GetTaskRequest, s.GetTaskResponse),
            "ListTasks": unary(tasks.ListTasks, s.ListTasksRequest, s.ListTasksResponse),
            "StreamTaskStatus": grpc.unary_stream_rpc_method_handler(
                tasks.StreamTaskStatus,
                request_deserializer=s.StreamTaskStatusRequest.FromString,
                response_serializer=_passthrough,
            ),
        },
    )
    cluster_handler = grpc.method_handlers_generic_handler(
        CLUSTER_SERVICE,
        {"GetCluster": unary(cluster.GetCluster, c.GetClusterRequest, c.GetClusterResponse)},
    )
    return [task_handler, cluster_handler]


class TetherServer:
    """The gRPC server around one controller; usable in-process by tests."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.controller = Controller(config)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                # gRPC core's latency mode: ~0.3 ms less per unary call on the 2-core box
                # (GetTask 1.05-1.15 -> 0.76-0.91 ms median), no idle CPU (docs/benchmarks.md).
                ("grpc.optimization_target", "latency"),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", 8 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        self.port = 0
        self.http: HttpSide | None = None
        self._serving: bool | None = None
        self._health_updates: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        await configure_models(self.config)
        ctl = self.controller
        auth = (
            Authenticator.from_file(self.config.auth_tokens_file)
            if self.config.auth_tokens_file
            else Authenticator()
        )
        tasks, cluster = TaskService(ctl, auth), ClusterService(ctl, auth)
        self.server.add_generic_rpc_handlers(_handlers(tasks, cluster))
        ctl.listeners.append(EventLogger())
        if self.config.http_listen:
            self.http = web.build(
                ctl,
                tasks,
                cluster,
                auth,
                self.health_of,
                listen=self.config.http_listen,
                metrics_listen=self.config.metrics_listen,
                allowed_hosts=self.config.http_allowed_hosts,
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (TASK_SERVICE, CLUSTER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
            pool=documented_pool(),
        )
        self.port = self._bind()
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_serving(False)

        def on_serving_changed(serving: bool) -> None:
            fut = asyncio.ensure_future(self._set_serving(serving))
            self._health_updates.add(fut)
            fut.add_done_callback(self._health_updates.discard)

        ctl.on_serving_changed = on_serving_changed
        await self._start_http()  # first: a taken --http address fails before anything runs
        await self.server.start()
        await ctl.start()
        await ctl.ready.wait()

    async def _start_http(self) -> None:
        """Before the controller starts, so the probes answer (NOT_SERVING) during start-up."""
        if self.http is None:
            return
        try:
            await self.http.start()
        except OSError as exc:
            if self.config.http_required:
                raise OSError(f"cannot serve HTTP on {self.config.http_listen}: {exc}") from exc
            # The default address (gRPC port + 1) is only a convenience: keep serving gRPC.
            log.warning("HTTP side off: cannot listen on %s: %s", self.config.http_listen, exc)
            await self.http.stop()
            self.http = None

    def health_of(self, service: str) -> str | None:
        """What grpc.health.v1 answers for ``service`` (None: NOT_FOUND), for /healthz and /readyz."""
        if service not in ("", TASK_SERVICE, CLUSTER_SERVICE):
            return None
        return "SERVING" if self._serving else "NOT_SERVING"

    def _bind(self) -> int:
        c = self.config
        if c.tls_cert is None or c.tls_key is None:
            return self.server.add_insecure_port(c.listen)
        credentials = grpc.ssl_server_credentials(
            [(c.tls_key.read_bytes(), c.tls_cert.read_bytes())],
            root_certificates=c.tls_client_ca.read_bytes() if c.tls_client_ca else None,
            require_client_auth=c.tls_client_ca is not None,
        )
        return self.server.add_secure_port(c.listen, credentials)

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", TASK_SERVICE, CLUSTER_SERVICE):
            await self.health.set(name, status)

    async def stop(self) -> None:
        self._serving = None
        await self._set_serving(False)
        try:
            await self.controller.stop()
        finally:
            # Even when the controller never started (a failed start), close the servers.
            if self.http is not None:
                await self.http.stop()
            await self.server.stop(grace=1.0)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"


async def configure_models(config: ServerConfig) -> None:
    """Hand the --model checkpoints to the task registry (engines get them at setup) and
    check each one now, tokenizer loaded, so a wrong path stops the server at start."""
    settings = llm_catalog.operator_settings(dict(config.models), config.model_path_roots)
    registry.configure(settings)
    if not config.models:
        return
    if importlib.util.find_spec("transformers") is None:
        raise RuntimeError("--model needs the [llm] extra (torch, transformers)")
    await asyncio.to_thread(llm_catalog.prepare)


def banner(server: TetherServer) -> str:
    addr = server.address
    n = server.controller.target_engines if server.controller is not None else server.config.engines
    flags = "-insecure" if server.config.tls_cert else "-plaintext"
    if server.config.auth_tokens_file:
        flags += " -H 'authorization: Bearer <token>'"
    payload = '{"task": "demo.sleep", "args": {"seconds": 5}}'
    text = (
        f"tether-server: serving on {addr} ({n} engines, data in {server.config.data_dir})\n"
        f"  try: grpcurl {flags} -d '{payload}' {addr} tether.v1.TaskService/SubmitTask"
    )
    if server.http is not None:
        text += f"\n  dashboard: {server.http.url()}\n  metrics:   {server.http.metrics_url()}"
    return text


async def serve(config: ServerConfig) -> int:
    server = TetherServer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is None:
        print(banner(server), flush=True)
        await waiter
    elif starting in done:
        waiter.cancel()
        print(
            f"tether-server: failed to start: {starting.exception()}", file=sys.stderr, flush=True
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.stop(), timeout=9)
        return 1
    else:
        starting.cancel()
    print("tether-server: shutting down", flush=True)
    try:
        await asyncio.wait_for(server.stop(), timeout=9)
    except Exception as exc:
        log.warning("shutdown was not clean: %s", exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    config, level = parse_args(argv)
    configure(level, config.log_format)
    # ipyparallel's hub warns once per publish_data call (ipyparallel issue 240).
    logging.getLogger("ipyparallel").setLevel(logging.ERROR)
    return asyncio.run(serve(config))
