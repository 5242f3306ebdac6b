"""Built-in demo tasks: small, predictable workloads for trying tether and for its tests.

Each one shows one behaviour an operator meets in real work:

============================  ===========================================================
``demo.echo(value)``          returns ``value``
``demo.sleep(seconds)``       sleeps; registers an ``on_interrupt`` hook that reports
``demo.append(path, line)``   appends a line to a file (after ``seconds``): an effect to count runs by
``demo.spin(seconds)``        pure-Python busy loop (SIGINT stops it at once)
``demo.fail(message)``        raises ``RuntimeError(message)``
``demo.stubborn(seconds)``    swallows ``KeyboardInterrupt``; only SIGTERM (or worse) stops it
``demo.c_call(seconds)``      one C call that releases the GIL and defers the SIGINT and
                              SIGTERM handlers until it returns; only SIGKILL stops it
``demo.count(n, interval)``   progress ``i/n`` and an output chunk ``"step i\\n"`` per step
``demo.leak(mb)``             keeps ``mb`` MiB alive in the engine for good (recycling)
``demo.spawn(seconds)``       starts a child process, reports its pid, then sleeps
``demo.hold(mb, seconds)``    holds ``mb`` MiB in a local (CPU, or CUDA via torch) and sleeps
``demo.resumable(n, ...)``    counts with a checkpoint per step; resumes from the last one
``demo.cooperative(...)``     registered ``cooperative=True``: stops itself via ``ctx.check()``
``demo.uninterruptible(...)`` sleeps inside ``ctx.uninterruptible()``
============================  ===========================================================

Importing this module only registers the tasks.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Final

from tether_server.runtime import TaskContext, task

_MiB: Final = 1024 * 1024
_LEAKED: list[bytearray] = []
"""What ``demo.leak`` keeps alive, on purpose, until the engine is recycled."""


@task("demo.echo")
def echo(value: Any = None) -> Any:
    """Return ``value`` unchanged."""
    return value


@task("demo.sleep")
def sleep(ctx: TaskContext, seconds: float) -> float:
    """Sleep ``seconds``; if interrupted, a cleanup hook writes a line to the output."""
    ctx.on_interrupt(lambda: ctx.emit("[on_interrupt] demo.sleep cleaned up\n"))
    time.sleep(seconds)
    return seconds


@task("demo.append")
def append(path: str, line: str, seconds: float = 0.0) -> str:
    """Sleep ``seconds``, then append ``line`` to the file ``path``: an effect to count runs by."""
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(line + "\n")
    return line


@task("demo.spin")
def spin(seconds: float) -> int:
    """Busy-loop in pure Python for ``seconds``; return the number of loop turns."""
    deadline = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
    return turns


@task("demo.fail")
def fail(message: str = "demo.fail was asked to fail") -> None:
    """Raise ``RuntimeError(message)``."""
    raise RuntimeError(message)


@task("demo.stubborn")
def stubborn(ctx: TaskContext, seconds: float) -> str:
    """Run for ``seconds`` whatever SIGINT says; ``TaskTerminated`` (SIGTERM) still ends it."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            time.sleep(min(remaining, 0.05))
        except KeyboardInterrupt:
            ctx.emit("[stubborn] ignoring KeyboardInterrupt\n")
    return "stubborn done"


@task("demo.c_call")
def c_call(ctx: TaskContext, seconds: float) -> float:
    """Block for ``seconds`` inside one C call that no signal can break; return its length.

    Stands for a long C or CUDA call: the call releases the GIL (the engine keeps answering
    on IOPub and control), but SIGINT and SIGTERM wait until it returns, and only SIGKILL
    stops it. It is ``time.sleep`` with every signal blocked in the calling thread: a
    signal goes to another thread (or stays pending), nothing wakes the sleep, and Python
    runs the handlers when the call is over. Unlike a calibrated compute loop, its length
    does not depend on how busy the machine is. It reports progress 0 ("in the C call")
    right before it blocks: a signal that lands before then still interrupts it.
    """
    ctx.progress(0.0, "in the C call")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    started = time.perf_counter()
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return time.perf_counter() - started


@task("demo.count")
def count(ctx: TaskContext, n: int, interval: float = 0.1) -> int:
    """Count to ``n``, one step per ``interval`` seconds, reporting progress and output."""
    for i in range(1, n + 1):
        time.sleep(interval)
        ctx.progress(i / n, f"step {i}/{n}")
        ctx.emit(f"step {i}\n")
    return n


@task("demo.leak")
def leak(mb: int) -> int:
    """Keep ``mb`` MiB referenced by the engine for good; return the MiB leaked so far."""
    _LEAKED.append(bytearray(b"\x01") * (mb * _MiB))  # multiplication touches every page
    return sum(len(block) for block in _LEAKED) // _MiB


@task("demo.spawn")
def spawn(ctx: TaskContext, seconds: float, child_seconds: float | None = None) -> int:
    """Start a child process that outlives the task, emit its pid, sleep ``seconds``.

    The runtime stops the child when the task ends (and counts it as left over).
    """
    lifetime = str(child_seconds if child_seconds is not None else seconds + 60.0)
    sleeper = shutil.which("sleep")
    command = (
        [sleeper, lifetime]
        if sleeper
        else [sys.executable, "-c", f"import time; time.sleep({lifetime})"]
    )
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    ctx.emit(f"child pid {child.pid}\n")
    time.sleep(seconds)
    return child.pid


@task("demo.hold")
def hold(mb: int, seconds: float, device: str = "cpu") -> int:
    """Hold ``mb`` MiB in a local variable for ``seconds`` (``device``: "cpu" or "cuda").

    An interrupted run shows whether the engine gives the memory back: the buffer lives
    only in this frame, which the traceback of the interrupt keeps alive until the runtime
    drops it.
    """
    buffer: Any
    if device == "cpu":
        buffer = bytearray(b"\x01") * (mb * _MiB)
    else:
        import torch  # only for device="cuda": importing torch takes seconds

        buffer = torch.ones(mb * _MiB, dtype=torch.uint8, device=device)
    time.sleep(seconds)
    return len(buffer) // _MiB


@task("demo.resumable")
def resumable(ctx: TaskContext, n: int, interval: float = 0.1) -> dict[str, int]:
    """Count to ``n`` with a checkpoint after every step; a resumed attempt starts there."""
    state = ctx.resume_state if isinstance(ctx.resume_state, dict) else {}
    start = int(state.get("done", 0))
    for i in range(start + 1, n + 1):
        time.sleep(interval)
        ctx.checkpoint({"done": i})
        ctx.progress(i / n, f"step {i}/{n}")
    return {"started_at": start, "done": n}


@task("demo.cooperative", cooperative=True)
def cooperative(ctx: TaskContext, seconds: float, step: float = 0.05) -> int:
    """Work in steps; SIGINT only sets ``ctx.interrupted``, and the task stops at a step end."""
    deadline = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < deadline:
        time.sleep(step)
        steps += 1
        if ctx.interrupted:
            ctx.emit(f"[cooperative] stopping after step {steps}\n")
            ctx.check()
    return steps


@task("demo.uninterruptible")
def uninterruptible(ctx: TaskContext, seconds: float, after: float = 0.0) -> str:
    """Sleep ``seconds`` inside ``ctx.uninterruptible()``, then ``after`` seconds outside it."""
    with ctx.uninterruptible():
        time.sleep(seconds)
        ctx.emit("[uninterruptible] block finished\n")
    time.sleep(after)
    return "done"
