"""The processes of a cluster, found and ended by pid: what a killed server left behind,
and what must be gone before a cluster starts again (psutil; no ipyparallel calls)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def remove_connection_files(profile_dir: Path, cluster_id: str) -> None:
    """The cluster file and the hub's connection files of ``cluster_id``."""
    for stale in glob.glob(str(profile_dir / "security" / f"*{cluster_id}*")):
        with contextlib.suppress(OSError):
            os.unlink(stale)


def cluster_pids(cluster_file: Path, cluster: Any, hub_children: Iterable[Any]) -> list[int]:
    """Pids of every process of a cluster: its file's and launchers' records, their
    descendants, and the hub's children seen while it lived (``hub_children``)."""
    import psutil

    pids: set[int] = set()
    if cluster_file.exists():
        pids.update(pids_in_cluster_file(cluster_file))
    if cluster is not None:
        launchers = [getattr(cluster, "controller", None)]
        launchers += list(getattr(cluster, "engines", {}).values())
        for launcher in launchers:
            pids.update(launcher_pids(launcher))
    for pid in list(pids):
        with contextlib.suppress(psutil.Error):
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    for child in hub_children:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                pids.add(child.pid)
    return sorted(pids)


def pids_in_cluster_file(path: Path) -> list[int]:
    """Pids of the controller and engine launchers recorded in an ipyparallel cluster file."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    pids: list[int] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("pid", "process_id") and isinstance(value, int) and value > 0:
                    pids.append(value)
                elif key == "pids" and isinstance(value, list):
                    pids.extend(v for v in value if isinstance(v, int) and v > 0)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(info)
    return pids


def launcher_pids(launcher: Any) -> list[int]:
    """Pids a launcher started (one process, or an engine set's)."""
    if launcher is None:
        return []
    found: list[int] = []
    pid = getattr(getattr(launcher, "process", None), "pid", None)
    if pid:
        found.append(int(pid))
    for child in getattr(launcher, "launchers", {}).values():
        found.extend(launcher_pids(child))
    return found


def kill_and_wait(pids: list[int], timeout: float) -> None:
    """SIGKILL every pid (that is still an ipyparallel process) and wait until all are gone."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    for proc in procs:
        kill_tree(proc.pid)
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if process_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if process_alive(p)]
    if alive:
        log.warning("cluster processes still alive after SIGKILL: %s", [p.pid for p in alive])


def process_alive(proc: Any) -> bool:
    """Whether a psutil.Process still runs (a zombie does not; a reused pid is told apart)."""
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (nannies, engines) if they still exist."""
    import psutil

    try:
        proc = psutil.Process(pid)
        cmdline = " ".join(proc.cmdline())
    except (psutil.Error, ValueError):
        return
    if "ipyparallel" not in cmdline and "ipengine" not in cmdline and "ipcontroller" not in cmdline:
        return  # the pid was reused by an unrelated process
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.kill()
