"""Making sure a signal that arrived during C code still interrupts the next blocking call.

CPython runs a Python signal handler only when the main thread next checks for pending
signals between bytecodes, or when a blocking system call it is in fails with EINTR. A
SIGINT that lands while the main thread is busy in C code (filling a large buffer, say)
and is immediately followed by a blocking call (``time.sleep``, a socket read) is
therefore not handled until that call returns: the signal has already been delivered, so
nothing interrupts the wait. Measured on an engine: ``bytearray(300 MiB)`` then
``time.sleep(8)``, SIGINT during the fill: the task ended after the full 8 s.

The :class:`SignalKicker` closes that gap. The C-level handler writes each signal number
to a wakeup fd (``signal.set_wakeup_fd``); a daemon thread reads it, and if the Python
handler has not run a moment later while the same task is still armed, it sends the main
thread a *kick*: ``SIGURG``, whose Python handler does nothing. The kick makes the
blocking call fail with EINTR, CPython then runs every pending handler (so the SIGINT is
handled as if it had arrived during the wait) and, when the handler does not raise,
retries the call (PEP 475). A kick never adds a SIGINT or SIGTERM of its own, so a
redundant kick is harmless.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Final

__all__ = ["KICK_DELAYS", "KICK_SIGNAL", "SignalKicker"]

KICK_SIGNAL: Final[int | None] = getattr(signal, "SIGURG", None)
"""Ignored by default; given a no-op Python handler so that it interrupts system calls.
None where the platform has no SIGURG (Windows): there the kicker stays off."""

KICK_DELAYS: Final = (0.02, 0.1, 0.3, 1.0, 3.0)
"""Seconds after the signal at which the main thread is kicked if it has not handled it."""

WATCHED: Final = frozenset({signal.SIGINT, signal.SIGTERM})


@dataclass(slots=True)
class _FollowUp:
    armed: object
    handled_runs: int
    received_at: float
    kicks_sent: int = 0


class SignalKicker:
    """Watches the wakeup fd and kicks the main thread; start and stop in the main thread.

    ``armed()`` names the task signals are armed for (None when idle: nothing is kicked);
    ``handler_runs(signum)`` counts the runs of the Python handler for ``signum``.
    """

    def __init__(self, armed: Callable[[], object], handler_runs: Callable[[int], int]) -> None:
        self._armed = armed
        self._handler_runs = handler_runs
        self._thread: threading.Thread | None = None
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._previous_wakeup_fd = -1
        self._previous_kick_handler: signal.Handlers | int | Callable[..., object] | None = None
        self._kick = 0
        self.kicks_sent = 0

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        kick = KICK_SIGNAL
        if self._thread is not None or kick is None or not hasattr(signal, "pthread_kill"):
            return
        self._kick = kick
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        reader.setblocking(False)
        self._previous_kick_handler = signal.signal(kick, _ignore_kick)
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._previous_wakeup_fd = previous
        self._reader, self._writer = reader, writer
        main_thread = threading.main_thread().ident
        assert main_thread is not None
        self._thread = threading.Thread(
            target=self._watch,
            args=(reader, main_thread, previous),
            name="tether-signal-kicker",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Give the wakeup fd and SIGURG back and end the thread (tests; engines keep it)."""
        thread = self._thread
        if thread is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        previous = self._previous_kick_handler
        signal.signal(self._kick, previous if previous is not None else signal.SIG_DFL)
        if self._writer is not None:
            self._writer.close()  # the reader sees EOF and the thread returns
        thread.join(5)
        if self._reader is not None:
            self._reader.close()
        self._thread = self._reader = self._writer = None

    def forget_in_child(self) -> None:
        """After fork: the watcher thread did not come along; unhook the wakeup fd and SIGURG."""
        if self._thread is None:
            return
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
            signal.signal(self._kick, signal.SIG_DFL)
        for sock in (self._reader, self._writer):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread = self._reader = self._writer = None

    def _watch(self, reader: socket.socket, main_thread: int, forward_fd: int) -> None:
        follow_ups: dict[int, _FollowUp] = {}
        while True:
            timeout = self._next_timeout(follow_ups)
            readable, _, _ = select.select([reader], [], [], timeout)
            if readable:
                try:
                    data = reader.recv(256)
                except BlockingIOError:  # spurious wakeup
                    data = None
                except OSError:
                    return
                if data == b"":  # stop() closed the other end
                    return
                if data:
                    self._received(data, forward_fd, follow_ups)
            self._kick_due(follow_ups, main_thread)

    def _received(self, data: bytes, forward_fd: int, follow_ups: dict[int, _FollowUp]) -> None:
        if forward_fd >= 0:  # someone used the wakeup fd before us: they still get it
            with contextlib.suppress(OSError):
                _write_all(forward_fd, data)
        armed = self._armed()
        if armed is None:
            return
        now = time.monotonic()
        for signum in set(data) & WATCHED:
            if signum not in follow_ups:
                follow_ups[signum] = _FollowUp(armed, self._handler_runs(signum), now)

    @staticmethod
    def _next_timeout(follow_ups: dict[int, _FollowUp]) -> float | None:
        if not follow_ups:
            return None
        now = time.monotonic()
        due = min(f.received_at + KICK_DELAYS[f.kicks_sent] for f in follow_ups.values())
        return max(0.0, due - now)

    def _kick_due(self, follow_ups: dict[int, _FollowUp], main_thread: int) -> None:
        now = time.monotonic()
        for signum, follow_up in list(follow_ups.items()):
            if (
                self._armed() is not follow_up.armed
                or self._handler_runs(signum) != follow_up.handled_runs
            ):
                del follow_ups[signum]  # handled, or that task is over
                continue
            if now < follow_up.received_at + KICK_DELAYS[follow_up.kicks_sent]:
                continue
            with contextlib.suppress(OSError, ValueError):
                signal.pthread_kill(main_thread, self._kick)
                self.kicks_sent += 1
            follow_up.kicks_sent += 1
            if follow_up.kicks_sent >= len(KICK_DELAYS):
                del follow_ups[signum]


def _ignore_kick(signum: int, frame: FrameType | None) -> None:
    """The kick's handler: its only job is to make a blocking call return EINTR."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
