"""The whole command line: the parser of every group, and the ServerConfig it gives."""

from __future__ import annotations

import argparse

from ..config import Limits, ServerConfig
from . import cluster, execution, llm, retry, serving, store

__all__ = ["build_parser", "parse_args"]

_GROUPS = (serving, cluster, execution, llm, retry, store)
"""In --help order; each module adds its group of flags with ``add_flags``."""


def build_parser() -> argparse.ArgumentParser:
    """The tether-server parser: logging flags first, then one group per concern."""
    p = argparse.ArgumentParser(
        prog="tether-server",
        description="gRPC control plane for long-running Python tasks on an ipyparallel cluster.",
    )
    p.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text, or one JSON object a line with task and engine ids (default %(default)s)",
    )
    for group in _GROUPS:
        group.add_flags(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, str]:
    """The server's configuration and log level from ``argv`` (default: ``sys.argv``).

    A usage error (a malformed value, flags that do not go together) prints the parser's
    message and exits with status 2, as argparse does.
    """
    p = build_parser()
    a = p.parse_args(argv)
    engine_hosts = cluster.engine_hosts(p, a)
    store.check(p, a)
    serving.check(p, a)
    http_listen = serving.http_address(p, a)
    models = llm.models(p, a)
    default_retry = retry.policy(p, a)
    return ServerConfig(
        listen=a.listen,
        engines=a.engines,
        spare_engines=a.spare_engines,
        pipeline_depth=a.pipeline_depth,
        data_dir=store.data_dir(a),
        task_modules=tuple(a.task_modules),
        engine_tags=tuple(a.engine_tags),
        attach=a.attach,
        engine_hosts=tuple(engine_hosts),
        ssh=cluster.ssh_settings(a),
        cluster_ip=a.cluster_ip,
        load_interval_seconds=a.load_interval,
        grace=execution.grace(a),
        default_timeout_seconds=a.default_timeout,
        default_queue_timeout_seconds=a.default_queue_timeout,
        unschedulable_queue_timeout_seconds=a.unschedulable_queue_timeout,
        llm_timeout=llm.timeout_policy(a),
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
        model_path_roots=llm.model_path_roots(a),
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_client_ca=a.tls_client_ca,
        http_listen=http_listen,
        http_required=a.http is not None,
        metrics_listen=a.metrics_listen,
        http_allowed_hosts=tuple(a.http_allowed_host),
        log_format=a.log_format,
        retry=default_retry,
        preemptible_tasks=a.preemptible_tasks,
        preempt_min_runtime=a.preempt_min_runtime,
    ), str(a.log_level)
