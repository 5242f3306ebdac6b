"""tether-server's HTTP side: Prometheus metrics, health probes, the dashboard and its gateway.

``build`` wires it to a controller and the gRPC servicers; ``app.TetherServer`` starts it
on its own loop, beside the grpc.aio server. Modules:

- ``server``: the aiohttp applications and routes (``HttpSide``);
- ``gateway``: the tether.v1 RPCs in the Connect protocol, calling the same servicers;
- ``metrics``: counters and histograms from the controller's events, gauges read at scrape;
- ``static/``: the dashboard (HTML, CSS, and JavaScript compiled from clients/dashboard).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from ..api import ClusterService, TaskService
from ..api.auth import Authenticator
from .gateway import Gateway
from .metrics import StateCollector, StoreMetrics, TaskMetrics
from .server import Health, HttpSide, split_address

__all__ = ["Health", "HttpSide", "build", "split_address"]


def build(
    controller: Any,
    tasks: TaskService,
    cluster: ClusterService,
    auth: Authenticator,
    health: Health,
    *,
    listen: str,
    metrics_listen: str = "",
    allowed_hosts: tuple[str, ...] = (),
) -> HttpSide:
    """The HTTP side of one server; call before ``controller.start()`` so no event is missed."""
    # No *_created series: they double the output, and few dashboards use them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    task_metrics = TaskMetrics(registry)
    controller.listeners.append(task_metrics.observe)
    controller.store.on_commit = StoreMetrics(registry).on_commit

    def streams() -> tuple[int, int]:
        # The subscriber index is the controller's; reading its size is all we do.
        index = controller._subscribers
        return len(index), index.lagging_cutoffs

    registry.register(StateCollector(lambda: controller, streams, task_metrics))
    return HttpSide(
        gateway=Gateway(tasks, cluster),
        auth=auth,
        registry=registry,
        health=health,
        listen=listen,
        metrics_listen=metrics_listen,
        allowed_hosts=allowed_hosts,
        problem=lambda: str(getattr(controller, "problem", "")),
    )
