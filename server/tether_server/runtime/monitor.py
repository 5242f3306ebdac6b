"""What an engine reports about itself from its own host: load, and memory over the limit.

:func:`start_engine_services` runs once per engine (from ``setup_engine``): it starts the
watchdog process (:mod:`.watchdog`) and a daemon thread that publishes, every
``load_interval`` seconds, ``{"tether": ["load", "", 0, {...}]}`` with the engine's RSS,
CPU % (of one core), on a GPU host the used and total memory of the GPUs it sees
(``nvidia-smi``; the whole GPU, every process on it), and the attempt that was armed
when the RSS was measured (``task_id`` "" when none). With a ``memory_limit_bytes`` the
thread looks at the RSS four times a second and reports at once when it is over the
limit, so the controller can interrupt the task without reading this host's process
table. A thread cannot run while a task holds the GIL in a C call; the reports pause
then (the controller's SIGKILL stage does not depend on them).

Imported on engines: stdlib and psutil only (``ipyparallel.datapub`` lazily).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from .attempts import BOOK
from .resources import ipython_shell, register_service_thread
from .watchdog import start_watchdog

__all__ = ["gpu_memory", "start_engine_services"]

MEMORY_CHECK = 0.25
"""Seconds between two RSS checks under a memory limit."""

_THREAD: threading.Thread | None = None
_SETTINGS: dict[str, Any] = {}


def start_engine_services(config: dict[str, Any]) -> None:
    """The watchdog and the load thread of this engine (idempotent; settings refreshed)."""
    global _THREAD
    prime_canning()  # before any thread of ours serializes (the load thread, a task's)
    _SETTINGS.update(
        engine_id=config.get("engine_id"),
        load_interval=float(config.get("load_interval") or 0),
        memory_limit=int(config.get("memory_limit_bytes") or 0),
    )
    if config.get("watchdog", True):
        start_watchdog()
    publish = _publisher()
    if publish is None or _SETTINGS["engine_id"] is None or _SETTINGS["load_interval"] <= 0:
        return
    if _THREAD is None or not _THREAD.is_alive():
        _THREAD = threading.Thread(target=_report_loop, args=(publish,), daemon=True)
        _THREAD.name = "tether-load"
        _THREAD.start()
        register_service_thread(_THREAD)  # its nvidia-smi is no task's leftover child


def prime_canning() -> None:
    """Resolve ipyparallel's canning maps now, in this thread (cheap once resolved).

    The first ``can``/``uncan`` of a process imports the maps' string keys
    (``"numpy.ndarray"``...) and replaces them, without a lock. The load thread's first
    report (``publish_data`` cans it) raced the setup reply's in the main thread: one
    popped a key the other was popping, and the setup failed with ``KeyError:
    'numpy.ndarray'`` (seen in ``tests/integration/test_runtime.py``, reports every 50 ms).
    Once resolved the maps are only read.
    """
    from ipyparallel.serialize import canning

    canning.can(None)
    canning.uncan(None)


def _publisher() -> Callable[[dict[str, Any]], None] | None:
    if getattr(ipython_shell(), "data_pub", None) is None:
        return None
    from ipyparallel.datapub import publish_data

    return publish_data  # type: ignore[no-any-return]


def gpu_memory() -> tuple[int, int]:
    """(used, total) bytes of the GPUs this process sees, by nvidia-smi; (0, 0) without."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "" or shutil.which("nvidia-smi") is None:
        return 0, 0
    cmd = ["nvidia-smi", "--query-gpu=index,memory.used,memory.total"]
    cmd += ["--format=csv,noheader,nounits"]
    if visible:
        cmd += ["-i", visible]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, 0
    used = total = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            used += int(float(parts[1]) * 1024 * 1024)
            total += int(float(parts[2]) * 1024 * 1024)
        except (IndexError, ValueError):
            continue
    return used, total


def _report_loop(publish: Callable[[dict[str, Any]], None]) -> None:
    proc = psutil.Process()
    proc.cpu_percent()  # the first call only starts the measurement
    next_report = 0.0
    while True:
        interval = float(_SETTINGS["load_interval"])
        limit = int(_SETTINGS["memory_limit"])
        now = time.monotonic()
        try:
            # Read before measuring: the RSS below is then that attempt's (or a later one's:
            # the controller charges it only to the attempt named here, if still running).
            armed = BOOK.armed_key()
            rss = proc.memory_info().rss
            over = bool(limit) and rss > limit
            if now >= next_report or over:
                next_report = now + interval
                used, total = gpu_memory()
                load = {
                    "engine_id": _SETTINGS["engine_id"],
                    "rss_bytes": rss,
                    "cpu_percent": proc.cpu_percent(),
                    "gpu_memory_used_bytes": used,
                    "gpu_memory_total_bytes": total,
                    "task_id": armed[0] if armed else "",
                    "attempt": armed[1] if armed else 0,
                }
                publish({"tether": ["load", "", 0, load]})
        except Exception:  # never let the thread die: the next round tries again
            pass
        time.sleep(min(interval, MEMORY_CHECK) if limit else interval)
