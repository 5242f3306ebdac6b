"""Stream subscribers: bounded per-subscriber queues fed by the controller's fan-out.

A subscriber never slows the controller or the others: the fan-out only appends
to a bounded deque; a subscriber whose deque is full is marked lagging and its
stream ends with UNAVAILABLE / SUBSCRIBER_LAGGING (it resumes from its token).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .core.errors import ShuttingDown, SubscriberLagging, TetherError
from .core.filters import TaskFilter
from .core.messages import EventKind


@dataclass(frozen=True, slots=True)
class StreamOptions:
    task_id: str | None
    filter: TaskFilter
    exclude_progress: bool
    full_view: bool


class Subscription:
    """One open StreamTaskStatus call."""

    def __init__(self, options: StreamOptions, maxsize: int, initial: Iterable[Any]) -> None:
        self.options = options
        self.maxsize = maxsize
        self.initial = list(initial)
        self._queue: collections.deque[Any] = collections.deque()
        self._wakeup = asyncio.Event()
        self._error: TetherError | None = None

    def wants(self, entry: Any) -> bool:
        o = self.options
        if o.exclude_progress and entry.kind in (EventKind.PROGRESS, EventKind.OUTPUT):
            return False
        if o.task_id is not None:
            return bool(entry.task.id == o.task_id)
        return o.filter.matches(entry.task)

    def push(self, entry: Any) -> None:
        if self._error is not None:
            return
        if len(self._queue) >= self.maxsize:
            self._queue.clear()
            self.close(
                SubscriberLagging(
                    f"subscriber fell more than {self.maxsize} events behind; resume from the last token",
                    metadata={"maxQueue": str(self.maxsize)},
                )
            )
            return
        self._queue.append(entry)
        self._wakeup.set()

    def close(self, error: TetherError) -> None:
        if self._error is None:
            self._error = error
        self._wakeup.set()

    def shutdown(self) -> None:
        self.close(ShuttingDown("the server is shutting down; resume from the last token"))

    async def get(self, timeout: float) -> Any | None:
        """Next entry, or None after ``timeout`` seconds of silence (time for a checkpoint)."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._error is not None:
                raise self._error
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                if self._queue:
                    continue
                if self._error is not None:
                    raise self._error from None
                return None
