"""The watchdog finds an engine's descendants and kills what a dead engine left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from tether_server.runtime import watchdog

from ..support import wait_until

# A stand-in engine: it starts a child that starts a grandchild, then waits.
ENGINE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
time.sleep(60)
"""


def test_descendants_match_psutil_children_recursive() -> None:
    engine = subprocess.Popen([sys.executable, "-c", ENGINE])
    try:
        tree = psutil.Process(engine.pid)
        wait_until(lambda: len(tree.children(recursive=True)) == 2)
        expected = {p.pid for p in tree.children(recursive=True)}
        assert set(watchdog._descendant_pids(engine.pid)) == expected
        assert watchdog._descendant_pids(2**22 + 7) == []  # no such process
    finally:
        for proc in [*psutil.Process(engine.pid).children(recursive=True)]:
            proc.kill()
        engine.kill()
        engine.wait()


def test_a_sigkilled_engine_s_descendants_are_killed() -> None:
    engine = subprocess.Popen([sys.executable, "-c", ENGINE])
    tree = psutil.Process(engine.pid)
    left = wait_until(lambda: (kids := tree.children(recursive=True)) and len(kids) == 2 and kids)
    killed: list[int] = []
    watcher = threading.Thread(target=lambda: killed.append(watchdog.watch(engine.pid, set())))
    watcher.start()
    try:
        time.sleep(3 * watchdog.SCAN)  # it has looked at least once
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
        watcher.join(timeout=10)
        # The child, and its own child unless that went with it first.
        assert len(killed) == 1 and killed[0] in (1, 2)
        for proc in left:
            wait_until(lambda p=proc: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE)
    finally:
        for proc in left:
            if proc.is_running():
                proc.kill()
