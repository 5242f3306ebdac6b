"""Waiting on many tasks over one stream, decided without I/O: :class:`OutcomeBoard`.

``TaskHandle.result`` and ``Client.map`` (and their asyncio twins) do not open a
stream per task. Each client has one *outcome stream*, started on the first wait:
a ``StreamTaskStatus`` of every task's terminal states (``states`` = the five
terminal ones, FULL view so that the result travels with the event,
``exclude_progress``). It is driven by a ``WatchMachine`` like any watch, so it
resumes from its last token on UNAVAILABLE (server restart, SUBSCRIBER_LAGGING)
and never yields a revision twice. The board decides which waiter each terminal
task goes to and when a waiter must ask the server (GetTask) instead of trusting
the stream.

Why a state filter and not a filter on this client's tasks: the API has no "these
names" filter, and labelling every submitted task would change what users see.
Terminal events are one per task, so the stream costs the client one small
message per finished task on the server, its own or not.

The rule that no terminal event is lost, whatever the timing:

* **Coverage.** The stream starts from a resume token taken (``ListTasks``) before
  it opens, so it carries every terminal event after that token. ``generation``
  counts such starts. A submit sent after a start (``mark`` taken before the
  request, with the same generation at wait time) creates a task all of whose
  events come after the token: the waiter need not ask the server.
* **Arrived before anyone waited.** A terminal task that no waiter claims is kept
  among the ``unclaimed`` (the newest ``unclaimed_limit``), so a waiter that
  registers after its event still finds it. When one was evicted since the mark,
  the waiter may have lost its event and asks the server.
* **Anything else** (a ``get_handle`` handle, a submit before the stream started,
  an expired token): the waiter registers first, then asks GetTask; a terminal
  answer ends the wait, otherwise the terminal event is still to come and the
  stream, already covering, will carry it.
* **Expired token** (OUT_OF_RANGE: the server no longer holds the log there, or
  it restarted as a new controller): the driver takes a fresh token, reopens the
  stream from it and calls ``restart``, which starts a new generation and names
  every current waiter; each is checked with GetTask, as above.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from tether._core import RetryPolicy
from tether._models import Task, TaskEvent, TaskFilter, TaskState, TaskView
from tether._watch import WatchMachine
from tether.v1 import task_pb2, task_service_pb2

__all__ = ["Coverage", "OutcomeBoard", "outcome_machine", "start_token_request"]

_Waiter = TypeVar("_Waiter")

TERMINAL_STATES = tuple(state for state in TaskState if state.is_terminal)
UNCLAIMED_LIMIT = 4096
"""Terminal tasks kept for waiters that have not registered yet; the oldest goes first."""


@dataclass(frozen=True)
class Coverage:
    """Where the outcome stream stood when a submit was sent (``OutcomeBoard.mark``)."""

    generation: int
    evictions: int


@dataclass(frozen=True)
class Registration:
    """What ``OutcomeBoard.register`` decided for one waiter."""

    task: Task | None
    """The terminal task, when it is already known: the wait is over."""
    check: bool
    """Ask the server (GetTask) before waiting: the stream may have missed the task's end."""


def start_token_request() -> task_service_pb2.ListTasksRequest:
    """The cheapest call that returns a resume token for "now": a one-task page."""
    return task_service_pb2.ListTasksRequest(page_size=1, view=task_pb2.TASK_VIEW_BASIC)


def outcome_machine(policy: RetryPolicy, resume_token: str) -> WatchMachine:
    """The ``WatchMachine`` of the outcome stream, continuing strictly after ``resume_token``."""
    return WatchMachine(
        policy=policy,
        task_filter=TaskFilter(states=TERMINAL_STATES),
        resume_token=resume_token,
        view=TaskView.FULL,
        exclude_progress=True,
    )


def terminal_task(item: object) -> Task | None:
    """The task of a stream item that ends it (later UPDATED events of an ended task repeat it)."""
    if isinstance(item, TaskEvent) and item.task.state.is_terminal:
        return item.task
    return None


class OutcomeBoard(Generic[_Waiter]):
    """Which waiter gets which terminal task; the drivers hold the lock and do the I/O.

    ``_Waiter`` is whatever the driver resolves (a ``concurrent.futures.Future`` or an
    ``asyncio.Future``); the board only stores and returns them.
    """

    def __init__(self, unclaimed_limit: int = UNCLAIMED_LIMIT) -> None:
        self.generation = 0
        """Starts of the stream from a fresh token so far; 0 while it never started."""
        self._waiters: dict[str, list[_Waiter]] = {}
        self._unclaimed: OrderedDict[str, Task] = OrderedDict()
        self._unclaimed_limit = unclaimed_limit
        self._evictions = 0

    def mark(self) -> Coverage:
        """Taken right before a SubmitTask is sent; passed back to ``register``."""
        return Coverage(self.generation, self._evictions)

    def register(self, name: str, waiter: _Waiter, coverage: Coverage | None) -> Registration:
        """Adds ``waiter`` for task ``name`` unless its terminal task is already here."""
        task = self._unclaimed.pop(name, None)
        if task is not None:
            return Registration(task, check=False)
        self._waiters.setdefault(name, []).append(waiter)
        covered = (
            coverage is not None
            and self.generation > 0
            and coverage.generation == self.generation
            and coverage.evictions == self._evictions
        )
        return Registration(None, check=not covered)

    def discard(self, name: str, waiter: _Waiter) -> None:
        """Forgets ``waiter`` (its wait ended, was answered by GetTask, or gave up)."""
        waiters = self._waiters.get(name)
        if waiters is None:
            return
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            del self._waiters[name]

    def resolve(self, task: Task, *, from_stream: bool = True) -> list[_Waiter]:
        """The waiters of a terminal ``task``, removed; with none, a stream task is kept."""
        waiters = self._waiters.pop(task.name, [])
        if not waiters and from_stream:
            self._unclaimed[task.name] = task
            self._unclaimed.move_to_end(task.name)
            while len(self._unclaimed) > self._unclaimed_limit:
                self._unclaimed.popitem(last=False)
                self._evictions += 1
        return waiters

    def take(self, name: str) -> list[_Waiter]:
        """Every waiter of ``name``, removed (asking the server about it failed)."""
        return self._waiters.pop(name, [])

    def restart(self) -> list[str]:
        """The stream starts over from a fresh token: a new generation; names to check."""
        self.generation += 1
        return list(self._waiters)

    def waiting(self) -> int:
        """How many tasks have at least one waiter."""
        return len(self._waiters)

    def drain(self) -> list[_Waiter]:
        """Every waiter, removed (the client closes, or the stream failed for good)."""
        waiters = [waiter for group in self._waiters.values() for waiter in group]
        self._waiters.clear()
        return waiters
