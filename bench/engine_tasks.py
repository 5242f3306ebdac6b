"""Task bodies for the raw-ipyparallel baselines, run on raw engines.

Engines unpickle these functions by reference, i.e. they import this module: it
imports only the standard library at the top and has no import-time side effects
(shared/notes/ipyparallel.md §6.2 item 9).
"""

from __future__ import annotations

import os
import time


def noop() -> None:
    """The no-op of B3/B4 (tether runs ``demo.echo``)."""
    return None


def engine_pid() -> int:
    return os.getpid()


def long_sleep(seconds: float = 60.0) -> float:
    """One ``time.sleep`` call, the same body as ``demo.sleep`` (B1)."""
    time.sleep(seconds)
    return seconds


def short_sleep(ms: float) -> float:
    """A short task of the storm (B7)."""
    time.sleep(ms / 1000)
    return ms


def stamped_publish(n: int, interval: float) -> int:
    """Publish ``n`` data messages, each stamped with the wall clock at send (B6 baseline)."""
    from ipyparallel.datapub import publish_data

    for i in range(n):
        time.sleep(interval)
        publish_data({"bench_seq": i, "bench_sent_ns": time.time_ns()})
    return n


def blocked_sleep(seconds: float) -> float:
    """The body of ``demo.c_call``: a sleep with every signal blocked (B2 baseline)."""
    import signal

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return seconds
