"""Where an engine runs, as the engine itself sees it (imported on engines: stdlib only).

tether starts remote engines with ``TETHER_ENGINE_HOST``, ``TETHER_ENGINE_SLOT`` and
``TETHER_ENGINE_TAGS`` in their environment (``cluster/hosts.py``); engines started any
other way (locally, or by an operator's launcher in attached mode) have none, and report
their hostname.

:func:`process_namespace` tells the server whether an engine's pid means anything on the
server's host: the same boot and the same PID namespace. A host name cannot tell that
(network namespaces, containers and twin VMs share host names); only then may the server
use the pid with psutil or ``os.kill``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["placement", "process_namespace"]


def process_namespace() -> str:
    """``<boot id>:<PID namespace inode>`` of this process ("" where /proc cannot say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{inode}"


def placement() -> dict[str, Any]:
    """``host``, ``slot`` (-1: not in a slot), ``host_tags`` and ``process_namespace``."""
    tags = [t for t in os.environ.get("TETHER_ENGINE_TAGS", "").split(",") if t]
    try:
        slot = int(os.environ.get("TETHER_ENGINE_SLOT", "-1"))
    except ValueError:
        slot = -1
    return {
        "host": os.environ.get("TETHER_ENGINE_HOST") or socket.gethostname(),
        "slot": slot,
        "host_tags": tags,
        "process_namespace": process_namespace(),
    }
