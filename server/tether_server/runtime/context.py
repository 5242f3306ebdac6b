"""``TaskContext``: what a running task can tell the controller, and ask about itself.

A task that declares a first parameter named ``ctx`` receives one::

    @task("demo.count")
    def count(ctx: TaskContext, n: int, interval: float = 0.1) -> int:
        for i in range(1, n + 1):
            time.sleep(interval)
            ctx.progress(i / n, f"step {i}/{n}")
            ctx.emit(f"step {i}\\n")
        return n

Everything the task reports travels to the controller as ipyparallel data messages
(``publish_data``, ~1 ms engine to controller), one message per call, shaped
``{"tether": [kind, task_id, attempt, payload]}``:

==============  ===============================  ==========================================
kind            payload                          sent by
==============  ===============================  ==========================================
``progress``    ``[fraction, message]``          :meth:`TaskContext.progress`
``output``      ``chunk`` (str)                  :meth:`TaskContext.emit`
``checkpoint``  the JSON state                   :meth:`TaskContext.checkpoint`
==============  ===============================  ==========================================

The ``(task_id, attempt)`` pair lets the controller drop stale messages, e.g. from a thread
a finished task left behind. Nothing is sent when a task starts: the controller needs
no word of it, because the engine holds a signal for an attempt that has not begun
(``runtime.attempts``). Outside an engine a ``sink`` callable receives the same
dicts, which makes the context usable in plain unit tests.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeVar

from .guard import TaskSignals, critical, uninterruptible
from .jsonvalue import MAX_CHECKPOINT_BYTES, JSONValue, encoded_size, to_json_value

__all__ = ["DEFAULT_MAX_OUTPUT_CHARS", "MESSAGE_KEY", "Sink", "TaskContext"]

Sink = Callable[[dict[str, Any]], None]
"""Receives each message dict; ``ipyparallel.datapub.publish_data`` on an engine."""

MESSAGE_KEY: Final = "tether"
DEFAULT_MAX_OUTPUT_CHARS: Final = 64 * 1024

H = TypeVar("H", bound=Callable[[], object])


class TaskContext:
    """The running task's handle on the runtime. Create one per attempt.

    Methods may be called from threads the task starts; ``uninterruptible()`` and the
    interrupt itself concern the main thread only (the one Python delivers signals to).
    Once the attempt has ended, reports from stray threads are dropped.
    """

    def __init__(
        self,
        task_id: str = "local",
        attempt: int = 0,
        resume_state: JSONValue = None,
        *,
        sink: Sink | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        cooperative: bool = False,
        signals: TaskSignals | None = None,
    ) -> None:
        if max_output_chars < 0:
            raise ValueError("max_output_chars must be >= 0")
        self._task_id = task_id
        self._attempt = attempt
        self._resume_state = resume_state
        self._sink = sink
        self._signals = signals if signals is not None else TaskSignals(cooperative=cooperative)
        self._max_output_chars = max_output_chars
        self._chunks: deque[str] = deque()
        self._output_chars = 0
        self._output_truncated = False
        self._hooks: list[Callable[[], object]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.publish_failures = 0
        """Messages the sink refused (counted, never raised into the task)."""
        self.published = 0
        """Reports (progress, output, checkpoints) handed to the sink; the controller waits
        for this many before it takes the outcome, so none lands after the task's end."""

    # ------------------------------------------------------------------ identity
    @property
    def task_id(self) -> str:
        return self._task_id

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def resume_state(self) -> JSONValue:
        """The last checkpoint of an earlier attempt, when this attempt resumes one; else None."""
        return self._resume_state

    # ------------------------------------------------------------------ interrupts
    @property
    def interrupted(self) -> bool:
        """True once an interrupt (SIGINT or SIGTERM) arrived for this attempt. Never resets."""
        return self._signals.interrupted

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if the task was interrupted (cooperative stop point)."""
        if self._signals.interrupted:
            self._signals.interrupt_owed = False
            raise KeyboardInterrupt

    def uninterruptible(self) -> uninterruptible:
        """``with ctx.uninterruptible():`` -- SIGINT is deferred to the end of the block.

        Use it around a step that must not be broken half-way (writing a file, updating a
        cache). SIGTERM still ends the task; SIGKILL ends the engine.
        """
        return uninterruptible(self._signals)

    def on_interrupt(self, callback: H) -> H:
        """Run ``callback()`` if this attempt is interrupted (SIGINT or SIGTERM).

        Hooks run after the task stopped, most recently registered first, each guarded:
        an error is written to the output and the next hook runs. A SIGTERM during the
        hooks stops them. Returns ``callback``, so it also works as a decorator.
        """
        if not callable(callback):
            raise TypeError("on_interrupt needs a callable")
        with self._lock:
            self._hooks.append(callback)
        return callback

    # ------------------------------------------------------------------ reports
    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the task is: ``fraction`` in [0, 1] (clamped) and a short message."""
        value = float(fraction)
        if math.isnan(value):
            raise ValueError("progress fraction is NaN")
        value = min(1.0, max(0.0, value))
        self._publish("progress", [value, str(message)])

    def emit(self, chunk: str) -> None:
        """Append ``chunk`` to the task's partial output (e.g. generated tokens) and send it.

        The output kept for the outcome is bounded: past ``max_output_chars`` the oldest
        text is dropped and ``output_truncated`` becomes true.
        """
        if not isinstance(chunk, str):
            raise TypeError(f"emit needs a str, got {type(chunk).__name__}")
        if not chunk:
            return
        if self._closed:
            return
        chunk = self._append(chunk)
        self._publish("output", chunk)

    def checkpoint(self, state: JSONValue) -> None:
        """Save ``state`` with the controller; a resumed attempt gets it as ``resume_state``.

        ``state`` must be JSON data of at most 1 MiB (compact UTF-8), else ``ValueError``.
        """
        try:
            value = to_json_value(state, "checkpoint")
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        size = encoded_size(value)
        if size > MAX_CHECKPOINT_BYTES:
            raise ValueError(
                f"checkpoint is {size} bytes of JSON; the limit is {MAX_CHECKPOINT_BYTES}"
            )
        self._publish("checkpoint", value)

    @property
    def output(self) -> str:
        """The partial output kept so far (the most recent ``max_output_chars`` characters)."""
        with self._lock:
            return "".join(self._chunks)

    @property
    def output_truncated(self) -> bool:
        return self._output_truncated

    # ------------------------------------------------------------------ runtime side
    def _take_hooks(self) -> list[Callable[[], object]]:
        """The hooks in the order they must run (last registered first), and forget them."""
        with self._lock:
            hooks, self._hooks = self._hooks, []
        hooks.reverse()
        return hooks

    def _note(self, text: str) -> None:
        """A line from the runtime itself (hook errors...), kept and sent like output."""
        self._append(text)
        self._publish("output", text, force=True)

    def _close(self) -> None:
        """The attempt is over: later reports (from stray threads) are dropped."""
        self._closed = True
        with self._lock:
            self._hooks.clear()

    def _append(self, chunk: str) -> str:
        limit = self._max_output_chars
        if len(chunk) > limit:
            chunk = chunk[len(chunk) - limit :] if limit else ""
            self._output_truncated = True
        with critical(self._signals), self._lock:
            self._chunks.append(chunk)
            self._output_chars += len(chunk)
            while self._output_chars > limit and self._chunks:
                excess = self._output_chars - limit
                head = self._chunks[0]
                if len(head) <= excess:
                    self._chunks.popleft()
                    self._output_chars -= len(head)
                else:
                    self._chunks[0] = head[excess:]
                    self._output_chars -= excess
                self._output_truncated = True
        return chunk

    def _publish(self, kind: str, payload: JSONValue, *, force: bool = False) -> None:
        sink = self._sink
        if sink is None or (self._closed and not force):
            return
        message = {MESSAGE_KEY: [kind, self._task_id, self._attempt, payload]}
        with critical(self._signals):
            try:
                sink(message)
                self.published += 1
            except Exception:
                self.publish_failures += 1
