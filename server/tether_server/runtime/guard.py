"""Guarded SIGINT/SIGTERM handling: a signal reaches only the task it was meant for.

Raw ipyparallel turns SIGINT into ``KeyboardInterrupt`` wherever the engine's main thread
happens to be. Under an interrupt storm that kills the *next* task, loses replies (the
interrupt lands in kernel code) and even ends the engine (notes/ipyparallel.md section
1.4). tether replaces both handlers for the life of the engine with the ones below.

Where a signal may raise
------------------------
Python runs a signal handler in the main thread, between two bytecodes of whatever frame
is executing. The handler gets that frame, so instead of trusting a flag that is flipped
a few bytecodes too early or too late, it looks at the stack:

* inside :func:`call_task` (the task function and everything it calls), SIGINT raises
  ``KeyboardInterrupt`` and SIGTERM raises :class:`TaskTerminated`;
* inside :func:`call_hooks` (the task's ``on_interrupt`` callbacks), SIGTERM raises
  ``TaskTerminated``; SIGINT is only counted;
* anywhere else while a task is *armed* (the runtime's own bookkeeping before and after
  the task), the signal is counted and *owed*: an owed signal is raised as soon as
  :func:`call_task` (or :func:`call_hooks`, for SIGTERM) begins, and dropped when the
  task already ended. The runtime's bookkeeping therefore never sees an exception it did
  not raise itself;
* while no task is armed, SIGINT does nothing at all and SIGTERM goes to the handler that
  was installed before (ipyparallel's: the engine stops after the current request).

Deferral
--------
Inside ``ctx.uninterruptible()`` blocks, and always for tasks registered with
``cooperative=True``, SIGINT only counts (``ctx.interrupted`` becomes true); a
non-cooperative task gets its ``KeyboardInterrupt`` when the outermost block exits.
SIGTERM is not deferred by user blocks. The runtime's own short sections that talk to
IOPub (:func:`critical`) defer both, so an exception never tears a message in half.
Deferral applies to the main thread only; other threads never receive signals.

A signal that arrives while the main thread is in C code and is followed at once by a
blocking call would wait for that call to return; :mod:`.kicker` wakes the main thread so
the handler runs promptly.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import CodeType, FrameType, TracebackType
from typing import Any, Final, TypeVar

from .kicker import SignalKicker

__all__ = [
    "GUARD",
    "RUNTIME_CODES",
    "SignalGuard",
    "TaskSignals",
    "TaskTerminated",
    "call_hooks",
    "call_task",
    "critical",
    "uninterruptible",
]

T = TypeVar("T")

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_MAX_STACK_WALK: Final = 100_000


class TaskTerminated(BaseException):
    """Raised inside a running task when its engine receives SIGTERM (escalation stage 2).

    A ``BaseException`` so that ``except Exception`` in task code does not swallow it, and
    raised even inside ``ctx.uninterruptible()`` blocks and cooperative tasks. A task that
    catches it anyway is stopped by the next stage, SIGKILL.
    """


class TaskSignals:
    """What the signals did to one attempt of one task. Written only in the main thread."""

    __slots__ = (
        "cooperative",
        "critical_depth",
        "interrupt_owed",
        "sigints",
        "sigterms",
        "terminate_owed",
        "uninterruptible_depth",
    )

    def __init__(self, *, cooperative: bool = False) -> None:
        self.cooperative = cooperative
        self.sigints = 0
        self.sigterms = 0
        self.interrupt_owed = False
        """A SIGINT arrived but was not raised yet (deferred, or it landed outside the task)."""
        self.terminate_owed = False
        """A SIGTERM arrived outside the task or hooks and was not raised yet."""
        self.uninterruptible_depth = 0
        self.critical_depth = 0

    @property
    def interrupted(self) -> bool:
        """A SIGINT or SIGTERM arrived for this attempt."""
        return self.sigints > 0 or self.sigterms > 0

    def owe(self, signum: int) -> None:
        """Count ``signum`` as arrived and owed, as when it lands in the runtime's own code
        (a signal the engine held for this attempt until it began, ``runtime.attempts``)."""
        if signum == signal.SIGTERM:
            self.sigterms += 1
            self.terminate_owed = True
        else:
            self.sigints += 1
            self.interrupt_owed = True

    def raise_owed(self, *, in_hooks: bool = False) -> None:
        """Raise a signal that arrived while raising was not allowed, if now it is."""
        if self.critical_depth:
            return
        if self.terminate_owed:
            self.terminate_owed = False
            raise TaskTerminated("terminated by SIGTERM")
        if in_hooks or self.cooperative or self.uninterruptible_depth:
            return
        if self.interrupt_owed:
            self.interrupt_owed = False
            raise KeyboardInterrupt


class _Region(enum.Enum):
    TASK = "task"
    HOOKS = "hooks"
    RUNTIME = "runtime"


class SignalGuard:
    """The engine's SIGINT and SIGTERM handlers, and the task they are armed for.

    One instance (:data:`GUARD`) serves the process. :meth:`install` must run in the main
    thread; it is idempotent.
    """

    def __init__(self) -> None:
        self._armed: TaskSignals | None = None
        self._installed = False
        self._previous_sigint: SignalHandler = None
        self._previous_sigterm: SignalHandler = None
        self._handler_runs: dict[int, int] = {signal.SIGINT: 0, signal.SIGTERM: 0}
        self._kicker = SignalKicker(lambda: self._armed, self._handler_runs.__getitem__)
        self._fork_hook_registered = False
        # Signals tether sent to one attempt (``send_to``): how many were sent, how many
        # handler runs took them, and whose they were (see ``_late``).
        self._targeted: dict[int, int] = {signal.SIGINT: 0, signal.SIGTERM: 0}
        self._consumed: dict[int, int] = {signal.SIGINT: 0, signal.SIGTERM: 0}
        self._target: dict[int, TaskSignals | None] = {signal.SIGINT: None, signal.SIGTERM: None}
        self.ignored_sigints = 0
        """SIGINTs that arrived while no task was armed (they did nothing)."""
        self.late_signals = 0
        """Signals sent to an attempt that had ended when they were handled (dropped)."""

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def armed(self) -> TaskSignals | None:
        """The signal state of the task the handlers are armed for, or None when idle."""
        return self._armed

    def install(self) -> None:
        """Make tether's handlers the process's SIGINT and SIGTERM handlers.

        Called again, it puts back a handler that task code replaced (keeping the
        originals found the first time). Forked children start without the guard.
        """
        if self._installed:
            if signal.getsignal(signal.SIGINT) != self._on_sigint:
                signal.signal(signal.SIGINT, self._on_sigint)
            if signal.getsignal(signal.SIGTERM) != self._on_sigterm:
                signal.signal(signal.SIGTERM, self._on_sigterm)
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
        self._kicker.start()
        if not self._fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget_in_child)
            self._fork_hook_registered = True

    def _forget_in_child(self) -> None:
        """A forked child (multiprocessing) gets plain Python signal behaviour, not the guard."""
        if not self._installed:
            return
        self._armed = None
        self._installed = False
        self._kicker.forget_in_child()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    @property
    def kicks_sent(self) -> int:
        """Times the main thread was kicked to handle a signal stuck behind a blocking call."""
        return self._kicker.kicks_sent

    def uninstall(self) -> None:
        """Put back the handlers found by :meth:`install` (tests; engines keep the guard)."""
        if not self._installed:
            return
        self._kicker.stop()
        signal.signal(signal.SIGINT, _restorable(self._previous_sigint))
        signal.signal(signal.SIGTERM, _restorable(self._previous_sigterm))
        self._installed = False
        self._armed = None

    def arm(self, signals: TaskSignals) -> None:
        """From now on SIGINT/SIGTERM belong to the task whose state is ``signals``."""
        self._armed = signals

    def disarm(self) -> None:
        """From now on SIGINT is ignored and SIGTERM stops the engine (previous handler)."""
        self._armed = None

    def send_to(self, signals: TaskSignals, signum: int) -> None:
        """Raise ``signum`` in the main thread for the attempt whose state is ``signals``.

        Called by the engine's control channel (another thread) while ``signals`` is
        armed, under the lock that also guards arming (``runtime.attempts``). The
        handler runs in the main thread some bytecodes later; if by then another
        attempt is armed, the signal is *late* and dropped, so it never reaches the
        attempt queued behind its target.
        """
        self._target[signum] = signals
        self._targeted[signum] += 1
        signal.pthread_kill(threading.main_thread().ident or 0, signum)

    def _late(self, signum: int, signals: TaskSignals | None) -> bool:
        """This handler run is a ``send_to`` signal whose attempt is no longer armed.

        Signals from elsewhere (the nanny, an operator's ``kill``) keep their old
        meaning. Several signals handled by one run (they coalesce) count as one.
        """
        if self._targeted[signum] == self._consumed[signum]:
            return False
        self._consumed[signum] = self._targeted[signum]
        if self._target[signum] is signals:
            return False
        self.late_signals += 1
        return True

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._handler_runs[signal.SIGINT] += 1
        signals = self._armed
        if self._late(signal.SIGINT, signals):
            return
        if signals is None:
            self.ignored_sigints += 1
            return
        signals.sigints += 1
        if (
            not signals.cooperative
            and signals.uninterruptible_depth == 0
            and signals.critical_depth == 0
            and _region(frame) is _Region.TASK
        ):
            signals.interrupt_owed = False
            raise KeyboardInterrupt
        signals.interrupt_owed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._handler_runs[signal.SIGTERM] += 1
        signals = self._armed
        if self._late(signal.SIGTERM, signals):
            return
        if signals is None:
            self._forward_sigterm(signum, frame)
            return
        signals.sigterms += 1
        if signals.critical_depth == 0 and _region(frame) is not _Region.RUNTIME:
            signals.terminate_owed = False
            raise TaskTerminated("terminated by SIGTERM")
        signals.terminate_owed = True

    def _forward_sigterm(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL, or a handler installed outside Python: die as SIGTERM would.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


GUARD: Final = SignalGuard()
"""The process's guard."""


# --------------------------------------------------------------------------- regions
def call_task(signals: TaskSignals, function: Callable[..., T], kwargs: dict[str, Any]) -> T:
    """Call the task function. SIGINT and SIGTERM raise only below this frame.

    A signal owed from the moments before (it landed in the runtime's bookkeeping after the
    task was armed) is raised first, so an early interrupt is never lost.
    """
    signals.raise_owed()
    return function(**kwargs)


def call_hooks(
    signals: TaskSignals,
    hooks: Iterable[Callable[[], object]],
    on_start: Callable[[Callable[[], object]], None],
    on_error: Callable[[Callable[[], object], BaseException], None],
) -> None:
    """Run cleanup hooks in order. SIGTERM raises ``TaskTerminated`` below this frame.

    ``on_start`` hears of each hook before it runs; a hook's failure goes to ``on_error``
    and the next hook runs. A SIGTERM (raised here, or owed from before) ends the run with
    ``TaskTerminated``: the caller stops and reports SIGTERM. SIGINT is only counted.
    """
    signals.raise_owed(in_hooks=True)
    for hook in hooks:
        on_start(hook)
        try:
            hook()
        except TaskTerminated:
            raise
        except BaseException as exc:
            on_error(hook, exc)
            del exc


class _DeferredSection:
    """A ``with`` block in the task's main thread during which some signals wait.

    Subclasses name the depth counter of TaskSignals they raise; a signal owed when
    the outermost block exits is raised then (if the block itself did not fail).
    """

    __slots__ = ("_active", "_signals")
    _depth: str

    def __init__(self, signals: TaskSignals | None) -> None:
        self._signals = signals
        self._active = False

    def __enter__(self) -> None:
        signals = self._signals
        if signals is not None and threading.current_thread() is threading.main_thread():
            setattr(signals, self._depth, getattr(signals, self._depth) + 1)
            self._active = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._active:
            return
        signals = self._signals
        assert signals is not None
        self._active = False
        depth = getattr(signals, self._depth) - 1
        setattr(signals, self._depth, depth)
        if exc_type is None and depth == 0:
            _raise_owed_here(signals)


class critical(_DeferredSection):
    """Defer SIGINT *and* SIGTERM for a short section of runtime code inside a task.

    Used around IOPub publishing so an exception never lands half-way through a message.
    A signal owed on exit is raised then (if the caller may raise it at all).
    """

    __slots__ = ()
    _depth = "critical_depth"


class uninterruptible(_DeferredSection):
    """``with ctx.uninterruptible():`` -- SIGINT waits until the outermost block exits.

    Nested blocks are fine. SIGTERM is not deferred. When the block exits with an exception
    of its own, that exception wins and the interrupt stays owed (visible as
    ``ctx.interrupted``).
    """

    __slots__ = ()
    _depth = "uninterruptible_depth"


def _raise_owed_here(signals: TaskSignals) -> None:
    """Raise what ``signals`` owes, as the caller's region allows (never in runtime code)."""
    region = _region(sys._getframe(1))
    if region is _Region.TASK:
        signals.raise_owed()
    elif region is _Region.HOOKS:
        signals.raise_owed(in_hooks=True)


RUNTIME_CODES: Final[frozenset[CodeType]] = frozenset(
    {
        call_task.__code__,
        call_hooks.__code__,
        TaskSignals.raise_owed.__code__,
        SignalGuard._on_sigint.__code__,
        SignalGuard._on_sigterm.__code__,
        SignalGuard._late.__code__,
        critical.__exit__.__code__,
        uninterruptible.__exit__.__code__,
        _raise_owed_here.__code__,
    }
)
"""The guard's own frames, which tracebacks shown to users leave out."""

# The code objects that mark a region. Handler frames count as runtime code: a second
# signal handled while the first handler runs must not raise over the first one's exception.
_TASK_CODE: Final[CodeType] = call_task.__code__
_HOOKS_CODE: Final[CodeType] = call_hooks.__code__
_HANDLER_CODES: Final[frozenset[CodeType]] = frozenset(
    {
        SignalGuard._on_sigint.__code__,
        SignalGuard._on_sigterm.__code__,
        SignalGuard._forward_sigterm.__code__,
        SignalGuard._late.__code__,
    }
)


def _region(frame: FrameType | None) -> _Region:
    """Which region the main thread's ``frame`` is in (the innermost marker wins)."""
    steps = 0
    while frame is not None and steps < _MAX_STACK_WALK:
        code = frame.f_code
        if code is _TASK_CODE:
            return _Region.TASK
        if code is _HOOKS_CODE:
            return _Region.HOOKS
        if code in _HANDLER_CODES:
            return _Region.RUNTIME
        frame = frame.f_back
        steps += 1
    return _Region.RUNTIME


def _restorable(handler: SignalHandler) -> Callable[[int, FrameType | None], Any] | int:
    if handler is None:  # installed outside Python: the best we can do is the default
        return signal.SIG_DFL
    return handler
