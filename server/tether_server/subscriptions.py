"""Stream subscribers: bounded per-subscriber queues fed by the controller's fan-out.

A subscriber never slows the controller or the others: the fan-out only appends
to a bounded deque; a subscriber whose deque is full is marked lagging and its
stream ends with UNAVAILABLE / SUBSCRIBER_LAGGING (it resumes from its token).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .core.errors import ShuttingDown, SubscriberLagging, TetherError
from .core.filters import TaskFilter
from .core.messages import EventKind

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class StreamOptions:
    task_id: str | None
    filter: TaskFilter
    exclude_progress: bool
    full_view: bool


class Subscription:
    """One open StreamTaskStatus call."""

    def __init__(
        self,
        options: StreamOptions,
        maxsize: int,
        initial: Iterable[Any],
        principal: str = "anonymous",
    ) -> None:
        self.options = options
        self.principal = principal
        self.maxsize = maxsize
        self.initial = list(initial)
        self.prefix: AsyncIterator[Any] | None = None
        """Items read from the store, sent before ``initial`` (history memory no longer holds)."""
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

    def push(self, entry: Any) -> bool:
        """Queue one entry; True when this push cut the subscriber off as lagging."""
        if self._error is not None:
            return False
        if len(self._queue) >= self.maxsize:
            self._queue.clear()
            self.close(
                SubscriberLagging(
                    f"subscriber fell more than {self.maxsize} events behind; resume from the last token",
                    metadata={"maxQueue": str(self.maxsize)},
                )
            )
            return True
        self._queue.append(entry)
        self._wakeup.set()
        return False

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


class SubscriberIndex:
    """The open subscriptions, indexed so one event costs one check per distinct filter.

    Fan-out runs on the controller's loop for every event; testing each of a thousand
    subscribers' filters one by one made it the server's hottest path (B5). Single-task
    streams are looked up by task id; filter streams are grouped by (filter,
    exclude_progress), so subscribers that share a filter share its evaluation.
    Filters on names (each Python client's shared watch stream holds one) are also
    looked up by task id: an event costs nothing for the clients that do not watch
    its task, however many there are.
    """

    def __init__(self) -> None:
        self._by_task: dict[str, set[Subscription]] = {}
        self._by_filter: dict[tuple[TaskFilter, bool], set[Subscription]] = {}
        """Groups of filter streams whose filter names no task: each event checks each."""
        self._by_names: dict[tuple[TaskFilter, bool], set[Subscription]] = {}
        """Groups of filter streams whose filter names tasks, found through ``_named``."""
        self._named: dict[str, set[tuple[TaskFilter, bool]]] = {}
        """Task id -> the keys of ``_by_names`` whose filter names it."""
        self._all: set[Subscription] = set()
        self._per_principal: dict[str, int] = {}
        self.lagging_cutoffs = 0
        """Subscribers ended as lagging so far (the metric tether_stream_lagging_cutoffs_total)."""

    def count_of(self, principal: str) -> int:
        """Open subscriptions of one principal (DESIGN §10: limits per principal)."""
        return self._per_principal.get(principal, 0)

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(tuple(self._all))

    def add(self, sub: Subscription) -> None:
        if sub in self._all:
            return
        self._all.add(sub)
        self._per_principal[sub.principal] = self.count_of(sub.principal) + 1
        o = sub.options
        key = (o.filter, o.exclude_progress)
        if o.task_id is not None:
            self._by_task.setdefault(o.task_id, set()).add(sub)
        elif o.filter.ids:
            if key not in self._by_names:
                for task_id in o.filter.ids:
                    self._named.setdefault(task_id, set()).add(key)
            self._by_names.setdefault(key, set()).add(sub)
        else:
            self._by_filter.setdefault(key, set()).add(sub)

    def discard(self, sub: Subscription) -> None:
        if sub not in self._all:
            return
        self._all.discard(sub)
        remaining = self.count_of(sub.principal) - 1
        if remaining:
            self._per_principal[sub.principal] = remaining
        else:
            self._per_principal.pop(sub.principal, None)
        o = sub.options
        key = (o.filter, o.exclude_progress)
        if o.task_id is not None:
            _remove(self._by_task, o.task_id, sub)
        elif o.filter.ids:
            _remove(self._by_names, key, sub)
            if key not in self._by_names:
                for task_id in o.filter.ids:
                    _remove(self._named, task_id, key)
        else:
            _remove(self._by_filter, key, sub)

    def deliver(self, entry: Any) -> None:
        """Push one log entry to every subscription that wants it."""
        progress = entry.kind in (EventKind.PROGRESS, EventKind.OUTPUT)
        for sub in tuple(self._by_task.get(entry.task.id, ())):
            if not (progress and sub.options.exclude_progress) and sub.push(entry):
                self.lagging_cutoffs += 1
        named = self._named.get(entry.task.id, ())
        groups = [*self._by_filter.items(), *((key, self._by_names[key]) for key in named)]
        for (flt, exclude_progress), group in groups:
            if progress and exclude_progress:
                continue
            if flt.matches(entry.task):
                for sub in tuple(group):
                    if sub.push(entry):
                        self.lagging_cutoffs += 1


def _remove(index: dict[K, set[V]], key: K, item: V) -> None:
    group = index.get(key)
    if group is not None:
        group.discard(item)
        if not group:
            del index[key]
