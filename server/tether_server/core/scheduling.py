"""Scheduling policy: the controller's pending queue and engine placement.

tether keeps its own queue instead of handing tasks to ipyparallel's load
balancer, so that it always knows which engine runs which task and never puts a
second task behind a running one (an interrupt can then only hit its own
target). This module holds the two decisions that queue needs:

* **order**: higher ``priority`` first, then submission order (``seq``), so equal
  priorities are served FIFO;
* **placement**: which idle engine a task goes to. A task may only run on an
  engine that carries all of its ``required_tags``; among those, the engine with
  the fewest tags wins (best fit), then the lowest id. Best fit keeps scarce
  engines (``gpu``) free for the tasks that need them, instead of filling them
  with work any engine could do.

Both are pure functions of their inputs, so ``ControlCore`` stays a state
machine and this file stays the one place to change the policy.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

from .model import Engine, Task

QueueKey = tuple[int, int, str]
"""Sort key of a queued task: (-priority, seq, id). ``id`` breaks ties of equal seq."""


def queue_key(task: Task) -> QueueKey:
    """Where ``task`` sorts in the pending queue (smaller runs first)."""
    return (-task.priority, task.seq, task.id)


class PendingQueue:
    """Task ids waiting for an engine, kept sorted by :func:`queue_key`.

    A sorted list rather than a heap, because the queue must support removal
    from the middle (cancel, queue timeout) and in-order scans that skip tasks no
    idle engine can take, and neither is natural on a heap. Insertion and removal
    are ``O(log n)`` searches plus a list shift, which is cheap at the sizes a
    controller holds.
    """

    def __init__(self) -> None:
        self._keys: list[QueueKey] = []
        self._key_of: dict[str, QueueKey] = {}

    def push(self, task: Task) -> None:
        """Queue ``task``; its priority and seq fix its place for good."""
        if task.id in self._key_of:
            raise ValueError(f"task {task.id!r} is already queued")
        key = queue_key(task)
        bisect.insort(self._keys, key)
        self._key_of[task.id] = key

    def remove(self, task_id: str) -> bool:
        """Take ``task_id`` out of the queue; False when it was not queued."""
        key = self._key_of.pop(task_id, None)
        if key is None:
            return False
        index = bisect.bisect_left(self._keys, key)
        del self._keys[index]
        return True

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._key_of

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        """Queued task ids in the order they should run."""
        return (key[2] for key in self._keys)


def choose_engine(required_tags: Iterable[str], idle: Sequence[Engine]) -> Engine | None:
    """The idle engine a task requiring ``required_tags`` should go to, or None.

    Best fit: among the engines carrying every required tag, the one with the
    fewest tags, then the lowest id (deterministic, so tests and logs agree).
    """
    needed = frozenset(required_tags)
    fitting = [engine for engine in idle if needed <= engine.tags]
    if not fitting:
        return None
    return min(fitting, key=lambda engine: (len(engine.tags), engine.id))


def plan_dispatch(
    queue: Iterable[str], tasks: dict[str, Task], idle: Sequence[Engine]
) -> list[tuple[Task, Engine]]:
    """Pair queued tasks with idle engines, in queue order.

    A task that fits none of the remaining idle engines is skipped and keeps its
    place; the scan stops as soon as no idle engine is left. One pass is enough:
    placing a task only removes engines, so a skipped task cannot fit later in
    the same pass.
    """
    free = list(idle)
    plan: list[tuple[Task, Engine]] = []
    for task_id in queue:
        if not free:
            break
        task = tasks[task_id]
        engine = choose_engine(task.required_tags, free)
        if engine is not None:
            plan.append((task, engine))
            free.remove(engine)
    return plan
