"""The cluster port: the only package that imports ipyparallel.

``IpyparallelCluster`` owns the ipyparallel ``Cluster`` (embedded mode) or
attaches to one, owns the ``Client`` on the service loop, and turns what
ipyparallel reports (registrations, unregistrations, IOPub data messages, apply
replies) into plain callbacks for the controller.
"""

from .ipp import ClusterCallbacks, ClusterConfig, EngineDied, IpyparallelCluster
from .processes import process_alive

__all__ = [
    "ClusterCallbacks",
    "ClusterConfig",
    "EngineDied",
    "IpyparallelCluster",
    "process_alive",
]
