"""The watchdog beside each engine: it outlives the engine and kills what its task left.

A SIGKILLed engine cannot clean up: the processes its task started (a tokenizer pool, a
data loader, a shell command) are reparented and keep running, holding memory or a GPU.
The controller cannot kill them when the engine runs on another host (its pids mean
nothing there), so the runtime starts this small process on the engine's own host, in a
session of its own (a kill of the engine's process group does not reach it)::

    python -m tether_server.runtime.watchdog ENGINE_PID [NANNY_PID]

While the engine lives, it lists the engine's descendants (its nanny and the watchdog
excluded) every ``SCAN`` seconds, remembering each as (pid, create time). When the
engine is gone, it kills every remembered process that still exists (a reused pid has
another create time and is left alone), with their own descendants, and exits. A
process started less than ``SCAN`` before the engine died can be missed: the runtime's
own clean-up after each task (``kill_new_children``) and the controller's supervision of
local engines still stand behind it.

Imported on engines: stdlib and psutil only.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil

__all__ = ["SCAN", "main", "start_watchdog"]

SCAN = 0.2
"""Seconds between two looks at the engine and its descendants. Each look reads the
parent of every process on the host (``_descendant_pids``): about 0.5 ms with 120
processes, so a watchdog costs about 0.3 % of a core (psutil's ``children`` at 0.1 s
cost 1.8 %, more than the idle server)."""

_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def start_watchdog() -> int:
    """Start the watchdog of this engine (once per engine process); its pid."""
    me = os.getpid()
    running = _STARTED.get(me)
    if running is not None and running.poll() is None:
        return running.pid
    nanny = _nanny_pid()
    cmd = [sys.executable, "-m", "tether_server.runtime.watchdog", str(me)]
    if nanny:
        cmd.append(str(nanny))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    _STARTED[me] = proc
    return proc.pid


def watchdog_pids() -> set[int]:
    """Pids of the watchdogs this process started (left out of a task's children)."""
    return {p.pid for p in _STARTED.values()}


def _nanny_pid() -> int:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            if "ipyparallel.engine.nanny" in " ".join(child.cmdline()):
                return int(child.pid)
    return 0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(engine_pid: int, spared: set[int]) -> int:
    """Watch until the engine is gone, then kill its leftovers; how many were killed."""
    try:
        engine = psutil.Process(engine_pid)
    except psutil.Error:
        return 0
    seen: dict[int, psutil.Process] = {}
    while _alive(engine):
        for pid in _descendant_pids(engine_pid):
            if pid not in spared and pid not in seen:
                with contextlib.suppress(psutil.Error):
                    seen[pid] = psutil.Process(pid)  # remembers its create time
        for pid in [p for p, proc in seen.items() if not _alive(proc)]:
            del seen[pid]
        time.sleep(SCAN)
    killed = 0
    for proc in seen.values():
        # psutil compares create times: a reused pid is a different process, not killed.
        if not _alive(proc):
            continue
        with contextlib.suppress(psutil.Error):
            for grandchild in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    grandchild.kill()
            proc.kill()
            killed += 1
    return killed


def _descendant_pids(root: int) -> list[int]:
    """Pids of ``root``'s descendants, from one pass over ``/proc/*/stat`` (Linux);
    psutil's walk elsewhere. The children of a process that exits meanwhile are
    found at the next look (they are reparented, so only while they live on)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = []
    if not names:
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(root).children(recursive=True)]
        return []
    children: dict[int, list[int]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 1024)
            finally:
                os.close(fd)
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            ppid = int(stat[stat.rindex(b")") + 2 :].split(b" ", 2)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m tether_server.runtime.watchdog ENGINE_PID [NANNY_PID]")
        return 2
    spared = {os.getpid(), *(int(a) for a in argv[1:])}
    watch(int(argv[0]), spared)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
