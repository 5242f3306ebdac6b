"""Which attempt an engine runs, and the control-channel requests that must agree with it.

With pipelined dispatch an engine holds its running attempt and one queued behind it
(the queued ``apply_request`` waits in the kernel's shell queue). Two controller
requests then need an answer that only the engine can give without a race, so they
travel on ipyparallel's *control* channel, which the kernel serves in its own thread
while the main thread runs a task:

``tether_signal_request`` ``{task_id, attempt, signal}``
    Deliver SIGINT or SIGTERM to that attempt. Under :class:`AttemptBook`'s lock (the
    same lock that arms and disarms the guard) the book checks that exactly that
    attempt is armed, then :meth:`.guard.SignalGuard.send_to` raises the signal in the
    main thread, naming its target. An attempt that has not begun yet (its request is
    still on its way, or waits in the shell queue) is *held*: the book keeps the
    signal and the attempt gets it, owed, the moment it is armed (a SIGTERM outranks a
    SIGINT). So the controller may signal the attempt it dispatched at any time, with
    no report from the engine that it began. Reply ``{"delivered": bool, "held":
    bool}``: both False when the attempt already ended (its result is on the way). A
    signal handled after its attempt ended is dropped by the guard, so it never lands
    in the next attempt.
``tether_withdraw_request`` ``{task_id, attempt}``
    Do not start that queued attempt. Reply ``{"withdrawn": bool}``: True when it had
    not begun (it will answer ``not_started`` when its turn comes, at once); False when
    it already began (the controller treats it as running).

:meth:`AttemptBook.drain` makes every later attempt answer ``not_started`` as well:
the runtime calls it when a task left memory behind, because the controller is about
to recycle the engine and what is queued must go back to the controller's queue rather
than start on an engine that will be killed.

SIGKILL stays with the nanny (``Client.send_signal``): it needs no target.
"""

from __future__ import annotations

import signal
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .guard import SignalGuard, TaskSignals

__all__ = [
    "BOOK",
    "SIGNAL_REQUEST",
    "WITHDRAW_REQUEST",
    "AttemptBook",
    "install_control_handlers",
]

SIGNAL_REQUEST: Final = "tether_signal_request"
WITHDRAW_REQUEST: Final = "tether_withdraw_request"

_SIGNALS: Final = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
_REMEMBERED: Final = 256
"""Attempts remembered as begun (and withdrawals and held signals kept): far more than one
engine queues."""

Key = tuple[str, int]
V = TypeVar("V")


class AttemptBook:
    """The engine's attempts: the armed one, the begun ones, the withdrawn ones, and the
    signals held for attempts that have not begun.

    Thread-safe; the main thread calls :meth:`begin` / :meth:`end`, the control thread
    :meth:`signal` / :meth:`withdraw`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: tuple[Key, TaskSignals, SignalGuard | None] | None = None
        self._begun: OrderedDict[Key, None] = OrderedDict()
        self._withdrawn: OrderedDict[Key, None] = OrderedDict()
        self._held: OrderedDict[Key, int] = OrderedDict()
        self._draining = ""

    def begin(self, key: Key, signals: TaskSignals, guard: SignalGuard | None) -> str:
        """Arm ``guard`` for attempt ``key``; or return why it must not start ("" = go on)."""
        with self._lock:
            held = self._held.pop(key, None)
            if key in self._withdrawn:
                del self._withdrawn[key]
                _remember(self._begun, key, None)
                return "withdrawn by the controller before it started"
            if self._draining:  # not begun: a withdrawal still says so
                return self._draining
            _remember(self._begun, key, None)
            if guard is not None:
                guard.arm(signals)
                if held is not None:  # raised as soon as the task function is called
                    signals.owe(held)
            self._armed = (key, signals, guard)
            return ""

    def end(self, key: Key) -> None:
        """Attempt ``key`` is over: disarm."""
        with self._lock:
            armed = self._armed
            if armed is not None and armed[0] == key:
                if armed[2] is not None:
                    armed[2].disarm()
                self._armed = None

    def drain(self, reason: str) -> None:
        """Start no further attempt on this engine (it is about to be recycled)."""
        with self._lock:
            self._draining = reason

    def armed_key(self) -> Key | None:
        """The attempt armed now, if any."""
        armed = self._armed
        return None if armed is None else armed[0]

    def signal(self, key: Key, name: str) -> str:
        """Signal ``name`` for attempt ``key``: raised if it is the armed one, held for its
        start if it has not begun. Returns ``"delivered"``, ``"held"`` or ``"missed"`` (it
        ended, or runs where no signal reaches it)."""
        signum = _SIGNALS[name]
        with self._lock:
            armed = self._armed
            if armed is not None and armed[0] == key:
                if armed[2] is None:  # off the main thread: no signal can reach it
                    return "missed"
                armed[2].send_to(armed[1], signum)
                return "delivered"
            if key in self._begun:
                return "missed"  # it ended: its result is on the way
            if self._held.get(key) != signal.SIGTERM:  # SIGTERM outranks SIGINT
                _remember(self._held, key, signum)
            return "held"

    def withdraw(self, key: Key) -> bool:
        """Attempt ``key`` must not start; False when it already began."""
        with self._lock:
            if key in self._begun:
                return False
            _remember(self._withdrawn, key, None)
            return True


def _remember(keys: OrderedDict[Key, V], key: Key, value: V) -> None:
    keys[key] = value
    while len(keys) > _REMEMBERED:
        keys.popitem(last=False)


BOOK: Final = AttemptBook()
"""The engine's book (one process, one engine)."""


def install_control_handlers(kernel: Any) -> None:
    """Serve :data:`SIGNAL_REQUEST` and :data:`WITHDRAW_REQUEST` on ``kernel``'s control channel."""
    handlers: dict[str, Callable[..., None]] = kernel.control_handlers
    handlers[SIGNAL_REQUEST] = _handler(kernel, _on_signal)
    handlers[WITHDRAW_REQUEST] = _handler(kernel, _on_withdraw)


def _on_signal(content: dict[str, Any]) -> dict[str, Any]:
    key = (str(content["task_id"]), int(content["attempt"]))
    answer = BOOK.signal(key, str(content["signal"]))
    return {"status": "ok", "delivered": answer == "delivered", "held": answer == "held"}


def _on_withdraw(content: dict[str, Any]) -> dict[str, Any]:
    key = (str(content["task_id"]), int(content["attempt"]))
    return {"status": "ok", "withdrawn": BOOK.withdraw(key)}


def _handler(
    kernel: Any, answer: Callable[[dict[str, Any]], dict[str, Any]]
) -> Callable[[Any, Any, dict[str, Any]], None]:
    """A kernel control handler: ``answer`` the request's content, reply on the same stream."""

    def handle(stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        try:
            content = answer(parent["content"])
        except Exception as exc:  # a malformed request: say so, keep the channel alive
            content = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc)}
        reply_type = str(parent["header"]["msg_type"]).replace("_request", "_reply")
        kernel.session.send(stream, reply_type, content, parent, ident=ident)

    return handle
