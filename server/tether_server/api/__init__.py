"""The gRPC face of the controller: servicers (thin: validate, call, convert), the
one error-mapping point, and protobuf <-> domain conversion."""

from .cluster_service import ClusterService
from .task_service import TaskService

__all__ = ["ClusterService", "TaskService"]
