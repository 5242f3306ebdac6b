"""Test-only tether tasks, loaded with ``tether-server --task-module tests.integration.tasks_for_tests``.

Each one starts a child process (and reports its pid in its output) and then resists
the interrupt ladder up to one stage, so a test can check that the child is gone
whichever stage ended the task:

- ``test.spawn_stubborn``: swallows ``KeyboardInterrupt``; SIGTERM ends it.
- ``test.spawn_c_call``: waits in one C call with every signal blocked; only SIGKILL
  (the engine's death) ends it.

Engines import this module by reference: no import-time side effects. The server and
its engines must find the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import signal
import subprocess
import time

from tether_server.runtime import TaskContext, task


def _start_child(ctx: TaskContext, seconds: float) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", str(seconds + 60.0)], stdin=subprocess.DEVNULL)
    ctx.emit(f"child pid {child.pid}\n")
    return child


@task("test.spawn_stubborn")
def spawn_stubborn(ctx: TaskContext, seconds: float) -> int:
    """Start a child, then sleep ``seconds`` whatever SIGINT says."""
    child = _start_child(ctx, seconds)
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            time.sleep(min(remaining, 0.05))
        except KeyboardInterrupt:
            ctx.emit("[spawn_stubborn] ignoring KeyboardInterrupt\n")
    return child.pid


@task("test.spawn_c_call")
def spawn_c_call(ctx: TaskContext, seconds: float) -> int:
    """Start a child, then block ``seconds`` in a C call no signal can break (demo.c_call)."""
    child = _start_child(ctx, seconds)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return child.pid
