"""tether.v1.ClusterService."""

from __future__ import annotations

from typing import Any

import grpc

from tether.v1 import cluster_service_pb2 as cpb

from ..controller import Controller
from ..runtime import registry
from ..tasks import llm_catalog
from . import convert
from .auth import Authenticator
from .errors import unary_errors


class ClusterService:
    """Servicer of tether.v1.ClusterService (registered by app.py)."""

    def __init__(self, controller: Controller, auth: Authenticator | None = None) -> None:
        self.controller = controller
        self.auth = auth or Authenticator()

    @unary_errors
    async def GetCluster(
        self, request: cpb.GetClusterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cpb.GetClusterResponse:
        self.auth.authenticate(context)
        ctl = self.controller
        limits = ctl.config.limits
        engines = ctl.engines()
        usable = len([e for e in engines if e.state.name in ("IDLE", "BUSY")])
        described = []
        for e in engines:
            pb = convert.engine_to_pb(e)
            load = ctl.loads.latest(e.id) if e.state.name != "LOST" else None
            if load is not None:
                pb.load.CopyFrom(convert.engine_load_to_pb(load))
            described.append(pb)
        return cpb.GetClusterResponse(
            engines=described,
            unschedulable_tasks=[f"tasks/{t.id}" for t in ctl.unschedulable_tasks()],
            mode=cpb.CLUSTER_MODE_EMBEDDED if ctl.cluster.embedded else cpb.CLUSTER_MODE_ATTACHED,
            target_size=ctl.target_engines,
            degraded=usable < ctl.target_engines,
            pending_tasks=ctl.pending_count,
            running_tasks=ctl.running_count,
            cluster_id=ctl.cluster.cluster_id,
            limits=cpb.ServerLimits(
                max_args_bytes=limits.max_args_bytes,
                max_grace=convert.duration(limits.max_grace_seconds),
                max_timeout=convert.duration(limits.max_timeout_seconds),
                max_output_bytes=limits.max_output_chars,
                max_page_size=limits.max_page_size,
                max_labels=limits.max_labels,
            ),
            registered_tasks=registry.names(),
            serving=ctl.serving,
            store_writable=ctl.journal.healthy,
            cluster_connected=ctl.supervisor.cluster_ok,
            cluster_restarts=ctl.supervisor.losses,
            problem=ctl.problem,
            models=[
                cpb.Model(name=m.name, kind=m.kind, context_length=m.context_length, chat=chat)
                for m, chat in llm_catalog.listed_models()
            ],
            model_paths_allowed=bool(llm_catalog.model_path_roots()),
        )
