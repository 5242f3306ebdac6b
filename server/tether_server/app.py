"""The tether-server process: configuration, gRPC server, health, reflection, signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tether.v1 import cluster_service_pb2, task_service_pb2

from . import web
from .api import ClusterService, TaskService
from .api.auth import Authenticator
from .api.reflection import documented_pool
from .cluster.hosts import SshSettings, parse_engine_hosts, read_hosts_file
from .config import Limits, LlmTimeoutPolicy, ServerConfig
from .controller import Controller
from .core.model import ErrorReason, GracePeriods, RetryPolicy
from .core.retry import DEFAULT_RETRY_ON, RETRYABLE_REASONS, validate_policy
from .logformat import EventLogger, configure
from .runtime import registry
from .tasks import llm_catalog
from .web import HttpSide, split_address

log = logging.getLogger("tether_server")

TASK_SERVICE = "tether.v1.TaskService"
CLUSTER_SERVICE = "tether.v1.ClusterService"


def _duration(text: str) -> float:
    """'500ms', '5s', '2m', '1h' or a bare number of seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 500ms, 5s, 2m)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[match.group(2)]


def _bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMG]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB)")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _model_flag(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of --model; the path made absolute (engines may run elsewhere)."""
    name, sep, path = text.partition("=")
    if not sep or not _MODEL_NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use NAME=PATH (NAME: letters, digits, '.', '_', '-')"
        )
    return name, str(Path(path).expanduser().resolve())


def _env_flag(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _models_file(path: Path) -> list[tuple[str, str]]:
    import tomllib

    table = tomllib.loads(path.read_text()).get("models")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError('needs a [models] table of NAME = "PATH"')
    base = path.expanduser().resolve().parent
    return [
        _model_flag(f"{name}={base / Path(value).expanduser()}") for name, value in table.items()
    ]


def default_data_dir() -> Path:
    try:
        from platformdirs import user_state_dir

        return Path(user_state_dir("tether"))
    except ImportError:  # pragma: no cover
        return Path.home() / ".local" / "state" / "tether"


_LLM_TIMEOUT = LlmTimeoutPolicy()
"""Defaults of the --llm-timeout-* flags."""


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    p = argparse.ArgumentParser(
        prog="tether-server",
        description="gRPC control plane for long-running Python tasks on an ipyparallel cluster.",
    )
    p.add_argument(
        "--listen", default="127.0.0.1:50051", help="address to listen on (default %(default)s)"
    )
    p.add_argument(
        "--engines",
        type=int,
        default=None,
        help="engines to start on this host (default: cores, at least 2; 0 with --engine-hosts)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the SQLite store and cluster files live (default: the user's state dir)",
    )
    p.add_argument(
        "--task-module",
        action="append",
        default=[],
        dest="task_modules",
        help="import this module on the server and engines to register tasks (repeatable)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        metavar="NAME=PATH",
        type=_model_flag,
        help="serve the Hugging Face checkpoint in directory PATH as llm.generate model NAME (repeatable; loaded on every engine at start)",
    )
    p.add_argument(
        "--models-file",
        type=Path,
        default=None,
        help='TOML file with a [models] table of NAME = "PATH" (relative paths: from the file), as --model',
    )
    p.add_argument(
        "--allow-model-path",
        action="append",
        default=[],
        dest="model_path_roots",
        metavar="DIR",
        help="let clients name a model directory (llm.generate model_path) inside DIR (repeatable; default: clients cannot name paths)",
    )
    p.add_argument(
        "--engine-tag",
        action="append",
        default=[],
        dest="engine_tags",
        help="tag every engine with this (repeatable); 'gpu' is detected",
    )
    p.add_argument(
        "--engine-hosts",
        default="",
        metavar="DEST=N,...",
        help="also run N engines on each of these hosts ([user@]host[:port]), placed by "
        "ipyparallel's SSH launcher; N omitted or 'auto': one per GPU (1 without GPUs). "
        "With engine hosts, --engines (this host's engines) defaults to 0",
    )
    p.add_argument(
        "--hosts-file",
        type=Path,
        default=None,
        help="TOML file with [hosts.NAME] tables (ssh, engines, tags, gpus), as --engine-hosts",
    )
    p.add_argument(
        "--cluster-ip",
        default="",
        metavar="ADDR",
        help="address the ipyparallel controller listens on and engines dial (default "
        "127.0.0.1; engine hosts need an address they can reach)",
    )
    p.add_argument(
        "--ssh-key", type=Path, default=None, help="identity file of the ssh calls to engine hosts"
    )
    p.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        dest="ssh_options",
        metavar="OPT",
        help="ssh -o option for engine hosts, e.g. StrictHostKeyChecking=accept-new (repeatable)",
    )
    p.add_argument(
        "--remote-python",
        default=sys.executable,
        help="the Python with tether installed on the engine hosts (default: this one's path)",
    )
    p.add_argument(
        "--remote-env",
        action="append",
        default=[],
        dest="remote_env",
        metavar="NAME=VALUE",
        type=_env_flag,
        help="set this variable for engines on engine hosts, e.g. PYTHONPATH for --task-module "
        "modules (repeatable)",
    )
    p.add_argument(
        "--no-gpu-tags",
        action="store_true",
        help="do not tag engines pinned to a GPU with 'gpu' and 'gpu:<index>'",
    )
    p.add_argument(
        "--gpu-placement",
        choices=("per-engine", "none"),
        default="per-engine",
        help="per-engine: on an engine host with GPUs, pin one engine per GPU "
        "(CUDA_VISIBLE_DEVICES); none: engines see every GPU (default %(default)s)",
    )
    p.add_argument(
        "--load-interval",
        type=_duration,
        default=2.0,
        help="how often each engine reports its RSS, CPU and GPU memory (GetCluster; default 2s)",
    )
    p.add_argument(
        "--attach",
        default="",
        help="attach to an existing ipyparallel cluster (cluster file or client connection file) instead of starting one",
    )
    p.add_argument(
        "--grace-sigint",
        type=_duration,
        default=2.0,
        help="time after SIGINT before SIGTERM (default 2s)",
    )
    p.add_argument(
        "--grace-sigterm",
        type=_duration,
        default=2.0,
        help="time after SIGTERM before SIGKILL (default 2s)",
    )
    p.add_argument(
        "--grace-sigkill",
        type=_duration,
        default=5.0,
        help="time to wait for a killed engine's death (default 5s)",
    )
    p.add_argument(
        "--default-timeout",
        type=_duration,
        default=None,
        help="timeout of tasks that give none (default: none)",
    )
    p.add_argument(
        "--default-queue-timeout",
        type=_duration,
        default=None,
        help="queue timeout of tasks that give none: a task still PENDING after it ends "
        "FAILED / QUEUE_TIMEOUT (default: none)",
    )
    p.add_argument(
        "--unschedulable-queue-timeout",
        type=_duration,
        default=600.0,
        help="queue timeout of a task that gives none while no engine carries its "
        "required_tags (attached mode; embedded mode refuses such a task at submit) "
        "(default 10m)",
    )
    p.add_argument(
        "--llm-timeout-base",
        type=_duration,
        default=_LLM_TIMEOUT.base_seconds,
        help="policy timeout of an llm.generate that gives none: fixed part (default 30s)",
    )
    p.add_argument(
        "--llm-timeout-per-token",
        type=_duration,
        default=_LLM_TIMEOUT.per_token_seconds,
        help="policy timeout of an llm.generate that gives none: per max_tokens (default 0.5s)",
    )
    p.add_argument(
        "--llm-timeout-per-prompt-char",
        type=_duration,
        default=_LLM_TIMEOUT.per_prompt_char_seconds,
        help="policy timeout of an llm.generate that gives none: per prompt char (default 10ms)",
    )
    p.add_argument(
        "--memory-limit",
        type=_bytes,
        default=0,
        help="interrupt a task whose engine RSS exceeds this (e.g. 2GiB; default off)",
    )
    p.add_argument(
        "--rss-tolerance",
        type=_bytes,
        default=64 * 1024**2,
        help="RSS growth after a task that still counts as reclaimed",
    )
    p.add_argument(
        "--max-args-bytes", type=_bytes, default=64 * 1024, help="largest accepted task arguments"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=_duration,
        default=5.0,
        help="checkpoint cadence of idle streams",
    )
    p.add_argument(
        "--max-streams-per-principal",
        type=int,
        default=2000,
        help="open StreamTaskStatus calls one principal may hold (default %(default)s)",
    )
    p.add_argument(
        "--subscriber-queue",
        type=int,
        default=1024,
        help="events a subscriber may lag before it is cut off",
    )
    p.add_argument(
        "--auth-tokens",
        type=Path,
        default=os.environ.get("TETHER_AUTH_TOKENS_FILE") or None,
        help="bearer tokens file, 'TOKEN PRINCIPAL [admin]' per line (default $TETHER_AUTH_TOKENS_FILE; none: auth off)",
    )
    p.add_argument(
        "--tls-cert", type=Path, default=None, help="serve TLS with this certificate chain (PEM)"
    )
    p.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert (PEM)")
    p.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (mutual TLS)",
    )
    p.add_argument(
        "--heartbeat",
        type=_duration,
        default=0.5,
        help="ipyparallel heartbeat period: engine registration and host-loss detection scale with it (default 500ms)",
    )
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="do not import torch and create the CUDA context on engines at start (faster engine start; an LLM engine's first task then counts that memory)",
    )
    p.add_argument(
        "--pipeline-depth",
        type=int,
        choices=(1, 2),
        default=2,
        help="tasks each engine holds: 2 sends the next task while one runs, so an engine "
        "never idles for a round trip (signals stay exact: they name their attempt); 1 sends a "
        "task only to an idle engine (default %(default)s)",
    )
    p.add_argument(
        "--spare-engines",
        type=int,
        default=0,
        help="warm spare engines beyond --engines: set up and ready, they take no task until an "
        "engine is lost, then one takes its place at once (no engine start, torch import or "
        "CUDA context on the critical path) and a new spare starts in the background. On GPU "
        "hosts a spare costs its CUDA context (default %(default)s)",
    )
    p.add_argument(
        "--retain-events",
        type=int,
        default=200_000,
        help="events kept in the store's log; older resume tokens expire (default %(default)s)",
    )
    p.add_argument(
        "--memory-events",
        type=int,
        default=5_000,
        help="newest events held in memory for live streams; older replays read the store (default %(default)s)",
    )
    p.add_argument(
        "--task-cache",
        type=int,
        default=2_000,
        help="finished tasks cached in memory; the rest is read from the store (default %(default)s)",
    )
    p.add_argument(
        "--hub-probe-interval",
        type=_duration,
        default=1.0,
        help="how often the ipyparallel controller's liveness is probed (default 1s)",
    )
    p.add_argument(
        "--hub-probe-timeout",
        type=_duration,
        default=2.0,
        help="a liveness probe not answered within this fails (default 2s)",
    )
    p.add_argument(
        "--hub-probe-failures",
        type=int,
        default=3,
        help="failed probes in a row after which the controller counts as frozen and the cluster is restarted (default %(default)s)",
    )
    p.add_argument(
        "--http",
        default=None,
        metavar="ADDR",
        help="serve the dashboard, /metrics, /healthz and /readyz here (default: the --listen host, its port + 1)",
    )
    p.add_argument("--no-http", action="store_true", help="serve no HTTP at all")
    p.add_argument(
        "--metrics-listen",
        default="",
        metavar="ADDR",
        help="serve /metrics (and the probes) on this address instead, without a token (e.g. an internal interface)",
    )
    p.add_argument(
        "--retry-max-attempts",
        type=int,
        default=1,
        help="default retry policy: attempts that may fail, the first included (default 1: no retry)",
    )
    p.add_argument(
        "--retry-on",
        type=_retry_reasons,
        default=None,
        metavar="REASON[,REASON...]",
        help="default retry policy: failure reasons retried, among "
        + ", ".join(sorted(r.value for r in RETRYABLE_REASONS))
        + " (default ENGINE_LOST,CLUSTER_LOST)",
    )
    p.add_argument(
        "--retry-initial-backoff",
        type=_duration,
        default=1.0,
        help="default retry policy: wait before the first retry (default 1s)",
    )
    p.add_argument(
        "--retry-max-backoff",
        type=_duration,
        default=30.0,
        help="default retry policy: longest wait between attempts (default 30s)",
    )
    p.add_argument(
        "--retry-multiplier",
        type=float,
        default=2.0,
        help="default retry policy: growth of the wait per retry (default 2)",
    )
    p.add_argument(
        "--retry-jitter",
        type=float,
        default=0.2,
        help="default retry policy: random spread of each wait, a fraction in [0, 1] (default 0.2)",
    )
    p.add_argument(
        "--preemptible-tasks",
        type=lambda text: tuple(name for name in text.split(",") if name),
        default=(),
        metavar="NAME[,NAME...]",
        help="task names submitted as preemptible unless the request says otherwise (default: none)",
    )
    p.add_argument(
        "--preempt-min-runtime",
        type=_duration,
        default=10.0,
        help="time a preempted task runs in its next attempt before it can be preempted again (default 10s)",
    )
    p.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or one JSON object a line with task and engine ids (default %(default)s)",
    )
    a = p.parse_args(argv)
    try:
        engine_hosts = parse_engine_hosts(a.engine_hosts)
        if a.hosts_file is not None:
            engine_hosts += read_hosts_file(a.hosts_file)
        if len({h.name for h in engine_hosts}) != len(engine_hosts):
            raise ValueError("a host is named twice")
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    if a.gpu_placement == "none":
        engine_hosts = [dataclasses.replace(h, gpus="none") for h in engine_hosts]
    if a.engines is None:
        a.engines = 0 if engine_hosts else max(2, os.cpu_count() or 2)
    if engine_hosts and a.attach:
        p.error("--engine-hosts starts engines; --attach uses a cluster started elsewhere")
    for flag in ("retain_events", "memory_events", "task_cache", "hub_probe_failures"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if a.engines < 0 or (a.engines < 1 and not engine_hosts):
        p.error("--engines must be at least 1 (0 only with --engine-hosts)")
    if a.spare_engines < 0:
        p.error("--spare-engines must not be negative")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca and not a.tls_cert:
        p.error("--tls-client-ca needs --tls-cert and --tls-key")
    try:
        http_listen = "" if a.no_http else (a.http or _next_port(a.listen))
        for address in (http_listen, a.metrics_listen):
            if address:
                split_address(address)
    except ValueError as exc:
        p.error(str(exc))
    if a.metrics_listen and not http_listen:
        p.error("--metrics-listen needs the HTTP side (drop --no-http)")
    models = list(a.models)
    if a.models_file is not None:
        try:
            models += _models_file(a.models_file)
        except (OSError, ValueError) as exc:
            p.error(f"--models-file {a.models_file}: {exc}")
    retry = RetryPolicy(
        max_attempts=a.retry_max_attempts,
        retry_on=a.retry_on if a.retry_on is not None else DEFAULT_RETRY_ON,
        initial_backoff=a.retry_initial_backoff,
        max_backoff=a.retry_max_backoff,
        multiplier=a.retry_multiplier,
        jitter=a.retry_jitter,
    )
    for name, problem in validate_policy(retry):
        p.error(f"--retry-{name.replace('_', '-').removeprefix('backoff-')}: {problem}")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        p.error("--model: a model name is given twice")
    return ServerConfig(
        listen=a.listen,
        engines=a.engines,
        spare_engines=a.spare_engines,
        pipeline_depth=a.pipeline_depth,
        data_dir=(a.data_dir or default_data_dir()).expanduser().resolve(),
        task_modules=tuple(a.task_modules),
        engine_tags=tuple(a.engine_tags),
        attach=a.attach,
        engine_hosts=tuple(engine_hosts),
        ssh=SshSettings(
            identity_file=a.ssh_key,
            options=tuple(a.ssh_options),
            remote_python=a.remote_python,
            gpu_tags=not a.no_gpu_tags,
            environment=tuple(a.remote_env),
        ),
        cluster_ip=a.cluster_ip,
        load_interval_seconds=a.load_interval,
        grace=GracePeriods(a.grace_sigint, a.grace_sigterm, a.grace_sigkill),
        default_timeout_seconds=a.default_timeout,
        default_queue_timeout_seconds=a.default_queue_timeout,
        unschedulable_queue_timeout_seconds=a.unschedulable_queue_timeout,
        llm_timeout=LlmTimeoutPolicy(
            base_seconds=a.llm_timeout_base,
            per_token_seconds=a.llm_timeout_per_token,
            per_prompt_char_seconds=a.llm_timeout_per_prompt_char,
        ),
        memory_limit_bytes=a.memory_limit,
        rss_tolerance_bytes=a.rss_tolerance,
        checkpoint_interval_seconds=a.checkpoint_interval,
        limits=Limits(
            max_args_bytes=a.max_args_bytes,
            subscriber_queue=a.subscriber_queue,
            max_subscribers_per_principal=a.max_streams_per_principal,
        ),
        auth_tokens_file=a.auth_tokens,
        heartbeat_ms=max(50, int(a.heartbeat * 1000)),
        retain_events=a.retain_events,
        memory_events=a.memory_events,
        task_cache=a.task_cache,
        hub_probe_interval=max(0.05, a.hub_probe_interval),
        hub_probe_timeout=max(0.05, a.hub_probe_timeout),
        hub_probe_failures=a.hub_probe_failures,
        warm_up=not a.no_warm_up,
        models=tuple(models),
        model_path_roots=tuple(str(Path(r).expanduser().resolve()) for r in a.model_path_roots),
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_client_ca=a.tls_client_ca,
        http_listen=http_listen,
        http_required=a.http is not None,
        metrics_listen=a.metrics_listen,
        log_format=a.log_format,
        retry=retry,
        preemptible_tasks=a.preemptible_tasks,
        preempt_min_runtime=a.preempt_min_runtime,
    ), str(a.log_level)


def _retry_reasons(text: str) -> frozenset[ErrorReason]:
    """--retry-on: comma-separated failure reasons, each one a policy may retry."""
    reasons = set()
    for name in filter(None, text.split(",")):
        try:
            reason = ErrorReason(name.strip().upper())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name!r} is not a failure reason") from None
        if reason not in RETRYABLE_REASONS:
            raise argparse.ArgumentTypeError(f"{name} cannot be retried")
        reasons.add(reason)
    return frozenset(reasons)


def _next_port(listen: str) -> str:
    """The default HTTP address: the gRPC host, the next port (0 stays 0: any free port)."""
    host, port = split_address(listen)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + 1 if port else 0}"


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
