"""Watching many handles over one stream, decided without I/O: :class:`SharedWatchBoard`.

``TaskHandle.watch`` and ``AsyncTaskHandle.watch`` do not open a stream per
handle. Each client has one *shared watch stream*: a ``StreamTaskStatus`` whose
``filter.names`` holds every task that one of its handles is watching right now.
A task's name never changes, so that stream carries every event of those tasks,
as a single-task stream would. The board routes each event to the watches of its
task (a *route* each); the drivers (``_sync_shared_watch``, ``_async_shared_watch``)
read the stream, make the calls the board asks for and wake the consumers.

What a watch yields is what a single-task watch started at the same moment yields:
a SNAPSHOT of the task's current state, then every later event in revision order,
the terminal one last. The rules that make it so:

* **Joining.** A new route waits (``LISTING``) until the stream is reopened. The
  driver stops reading the stream at token ``T`` (the last message it handed to
  the ``WatchMachine``), lists the joining tasks with ``ListTasks`` (names filter,
  BASIC view: the same task a single-task stream's SNAPSHOT shows) and reopens the
  stream from ``T`` with the new names. The listing is made after the server sent
  ``T``, so it shows every change up to ``T``: whatever the snapshot does not show
  comes after ``T`` and is on the reopened stream. Events the snapshot already shows
  (revision up to the snapshot's) are dropped per route.
* **Leaving.** A route whose task ended leaves the board at once; the stream keeps
  its name until the next reopen (an ended task sends next to nothing). A watch
  closed early leaves and asks for a reopen, so that a chatty task stops flowing.
* **No loss, no duplicate.** The stream is driven by a ``WatchMachine``: it resumes
  from its last token across UNAVAILABLE (a restart, SUBSCRIBER_LAGGING) and
  re-lists after an expired token; each route keeps the highest revision it queued
  and drops anything not above it.
* **Backpressure.** Each route queues at most ``queue_limit`` events. A route whose
  consumer falls that far behind is *detached*: it leaves the board (the others
  never wait for it) and, once its consumer has drained its queue, its watch goes on
  over a single-task stream of its own, resumed from the token of the last event it
  queued and skipping revisions up to that event's. Memory per watch stays bounded
  and nothing is lost.
* **Size.** One filter holds at most ``max_names`` tasks (the server's limit). A
  watch that would go past it starts detached: a single-task stream of its own.
"""

from __future__ import annotations

import enum
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from tether._convert import snapshot_event, task_from_proto
from tether._core import RetryPolicy
from tether._exceptions import TetherError
from tether._models import Task, TaskEvent, TaskEventType, TaskFilter, TaskView
from tether._outcomes import start_token_request
from tether._watch import WatchMachine
from tether.v1 import task_pb2, task_service_pb2

__all__ = [
    "HandleWatchPlace",
    "Join",
    "Route",
    "RouteState",
    "SharedWatchBoard",
    "abandon",
    "closed_error",
    "settle",
    "shared_machine",
]

QUEUE_LIMIT = 1024
"""Events one watch may hold unconsumed before it leaves the shared stream (the server's
own per-subscriber queue holds as many)."""
MAX_NAMES = 1000
"""Tasks one shared stream follows at most: the server's bound on ``TaskFilter.names``."""

_PROGRESS = (TaskEventType.PROGRESS, TaskEventType.OUTPUT)
_Signal = TypeVar("_Signal")


class RouteState(enum.Enum):
    """Where one watch stands on the shared stream."""

    LISTING = "listing"
    """Joined; its SNAPSHOT comes with the next reopen of the stream."""
    LIVE = "live"
    """On the stream: its task's events are queued as they come."""
    ENDED = "ended"
    """Its task's terminal event is queued; nothing more comes."""
    DETACHED = "detached"
    """Left the stream: after its queue, the watch continues on a stream of its own."""
    FAILED = "failed"
    """``error`` is raised after its queue (the task does not exist, the client closed...)."""
    CLOSED = "closed"
    """Its consumer closed the watch."""


@dataclass(eq=False)
class Route(Generic[_Signal]):
    """One handle's watch on the shared stream; the board changes it, the consumer drains it.

    ``signal`` is whatever the driver wakes the consumer with (a ``threading.Condition``,
    an ``asyncio.Event``); the board only hands the routes to wake back.
    """

    name: str
    exclude_progress: bool
    signal: _Signal
    state: RouteState = RouteState.LISTING
    items: deque[TaskEvent] = field(default_factory=deque)
    floor: int = 0
    """Highest revision queued (the SNAPSHOT's included); nothing at or below it is queued."""
    token: str = ""
    """Resume token of the last item queued: a single-task stream from it, skipping
    revisions up to ``floor``, continues exactly where the queue ends."""
    error: BaseException | None = None
    abandoned: bool = False
    """Set (from any thread, by a finalizer) when the watch was dropped unclosed: the
    board lets the route go at the next event instead of queueing for nobody."""

    @property
    def on_board(self) -> bool:
        """Still joining or live: more may come from the shared stream."""
        return self.state in (RouteState.LISTING, RouteState.LIVE)


@dataclass(frozen=True)
class StreamShape:
    """The filter and progress preference of the next shared stream."""

    task_filter: TaskFilter
    exclude_progress: bool


def shared_machine(policy: RetryPolicy, resume_token: str) -> WatchMachine:
    """The ``WatchMachine`` of a shared stream starting strictly after ``resume_token``.

    Its filter is set by ``WatchMachine.retarget`` before every open.
    """
    return WatchMachine(policy=policy, task_filter=TaskFilter(), resume_token=resume_token)


JoinCall = task_service_pb2.ListTasksRequest | str
"""A call a join asks for: a ``ListTasks`` page, or a task name to look up alone (GetTask,
``SNAPSHOT_VIEW``)."""


class Join(Generic[_Signal]):
    """One round of joining (see "Joining"), decided without I/O.

    The driver asks ``next_call`` what to call, makes the call and hands back its
    answer (``on_answer``) or its error (``on_error``; UNAVAILABLE is the driver's to
    retry), holding its lock around both, and wakes the routes they return. The
    joining tasks are listed in one ``ListTasks`` (names filter, BASIC view: what a
    single-task stream's SNAPSHOT shows); a task the listing does not show, or every
    task when one refused name made the listing fail, is looked up alone, so that its
    watch fails with its own error (TaskNotFound, InvalidArgument) and no other.
    ``resume_token`` is where the stream reopens: the stream's own token, or, when it
    has none yet, the listing's (taken before the listing).
    """

    def __init__(
        self,
        board: SharedWatchBoard[_Signal],
        routes: Sequence[Route[_Signal]],
        resume_token: str | None,
    ) -> None:
        self._board = board
        self.resume_token = resume_token
        self._listing: task_service_pb2.ListTasksRequest | None = None
        if routes:  # an empty names filter would list every task
            self._listing = task_service_pb2.ListTasksRequest(
                page_size=MAX_NAMES,
                filter=task_service_pb2.TaskFilter(names=sorted({r.name for r in routes})),
                view=task_pb2.TASK_VIEW_BASIC,
            )
        self._routes = list(routes)
        self._listed: dict[str, Task] = {}
        self._alone: list[Route[_Signal]] = []
        self._need_token = False

    def next_call(self) -> JoinCall | None:
        """The next call to make; None when the round is over."""
        if self._listing is not None:
            return self._listing
        if self._need_token:
            return start_token_request()
        return self._alone[0].name if self._alone else None

    def on_answer(self, answer: task_service_pb2.ListTasksResponse | Task) -> list[Route[_Signal]]:
        """The answer to ``next_call``; returns the routes that got their SNAPSHOT."""
        if isinstance(answer, Task):
            route = self._alone.pop(0)
            return self._settle([route], {route.name: answer})
        if self._need_token:
            self._need_token = False
            self.resume_token = answer.resume_token
            return []
        assert self._listing is not None
        if self.resume_token is None:
            self.resume_token = answer.resume_token
        for message in answer.tasks:
            self._listed[message.name] = task_from_proto(message)
        if answer.next_page_token:
            self._listing.page_token = answer.next_page_token
            return []
        self._listing = None
        return self._settle(self._routes, self._listed)

    def on_error(self, error: TetherError) -> list[Route[_Signal]]:
        """``next_call``'s call failed for good; returns the routes that fail with it."""
        if self._listing is not None:  # a refused name spoils the batch: each goes alone
            self._listing = None
            self._need_token = self.resume_token is None
            self._alone = [route for route in self._routes if route.state is RouteState.LISTING]
            return []
        if self._need_token:
            raise error
        route = self._alone.pop(0)
        self._board.fail(route, error)
        return [route]

    def _settle(
        self, routes: Sequence[Route[_Signal]], tasks: Mapping[str, Task]
    ) -> list[Route[_Signal]]:
        assert self.resume_token is not None
        woken, unlisted = self._board.on_listed(routes, tasks, self.resume_token)
        self._alone.extend(unlisted)
        return woken


class HandleWatchPlace(Generic[_Signal]):
    """Where a handle's watch reads: its route on the shared stream, then (if the route
    had to leave it) a single-task stream of its own. ``HandleWatch`` and
    ``AsyncHandleWatch`` each hold one; ``machine`` is their single-task watch.
    """

    def __init__(self, machine: WatchMachine) -> None:
        self.machine = machine
        self.route: Route[_Signal] | None = None
        self.own_stream = False
        """True once the watch reads its own stream (``machine``)."""
        self._token = ""

    @property
    def resume_token(self) -> str:
        """Token of the last event yielded (from the shared stream) or received (own stream)."""
        return self.machine.resume_token if self.own_stream else self._token

    def joined(self, watch: object, route: Route[_Signal]) -> None:
        """``watch`` got ``route``; if ``watch`` is dropped unclosed, the route goes too."""
        self.route = route
        weakref.finalize(watch, abandon, route)

    def take(self, item: TaskEvent | RouteState) -> TaskEvent | None:
        """What the shared stream gave (``next_item``): the event to yield, or None once
        nothing more comes from it (``own_stream`` then says whether the watch goes on)."""
        if isinstance(item, TaskEvent):
            self._token = item.resume_token
            return item
        if item is RouteState.DETACHED and self.route is not None:
            self.own_stream = True
            if self.route.token:  # else it never joined: a fresh single-task watch
                self.machine.resume_after(self.route.token, self.route.floor)
        return None


def closed_error() -> TetherError:
    """What every watch still on the shared stream raises when its client closes."""
    return TetherError(
        "the client was closed while watching the task", code=grpc.StatusCode.CANCELLED
    )


def abandon(route: Route[Any]) -> None:
    """A watch was dropped without being closed (its finalizer): let its route go.

    Safe from any thread and at any moment (it only sets a flag the board reads).
    """
    route.abandoned = True


def settle(route: Route[Any]) -> RouteState:
    """The state of a drained ``route`` that is off the board; raises the error of a FAILED one.

    DETACHED: the consumer continues on a stream of its own. ENDED or CLOSED: the
    watch is over.
    """
    if route.state is RouteState.FAILED and route.error is not None:
        raise route.error
    return route.state


SNAPSHOT_VIEW = TaskView.BASIC
"""The view of a joining task looked up alone (GetTask) when the listing cannot answer for it."""


class SharedWatchBoard(Generic[_Signal]):
    """Which route each event of the shared stream goes to; the drivers do the I/O.

    Not thread-safe: the blocking driver holds its lock around every call.
    """

    def __init__(self, *, queue_limit: int = QUEUE_LIMIT, max_names: int = MAX_NAMES) -> None:
        self._queue_limit = queue_limit
        self._max_names = max_names
        self._routes: dict[str, list[Route[_Signal]]] = {}
        """Routes LISTING or LIVE, by task name."""
        self.changed = False
        """The open stream no longer fits the routes: reopen it (``plan`` resets it)."""

    @property
    def empty(self) -> bool:
        """No route is joining or live: the stream has nothing to follow."""
        return not self._routes

    def add(self, name: str, signal: _Signal, *, exclude_progress: bool) -> Route[_Signal]:
        """A new watch of task ``name``; LISTING, or DETACHED when the stream is full."""
        if name not in self._routes and len(self._routes) >= self._max_names:
            return Route(name, exclude_progress, signal, state=RouteState.DETACHED)
        route = Route(name, exclude_progress, signal)
        self._routes.setdefault(name, []).append(route)
        self.changed = True
        return route

    def remove(self, route: Route[_Signal]) -> None:
        """The consumer closed ``route``; a live route asks for a reopen without its task."""
        live = route.state is RouteState.LIVE
        if self._leave(route) and live:
            self.changed = True
        if route.on_board:
            route.state = RouteState.CLOSED

    def joining(self) -> list[Route[_Signal]]:
        """The routes waiting for their SNAPSHOT; called right before a (re)open.

        Clears ``changed``: the open that follows fits every route known now.
        """
        for route in self._every():
            if route.abandoned:
                self.remove(route)
        self.changed = False
        return [route for route in self._every() if route.state is RouteState.LISTING]

    def shape(self) -> StreamShape | None:
        """What the next stream covers (None: no live route, open nothing).

        Progress is left out only when every live route leaves it out.
        """
        live = [route for route in self._every() if route.state is RouteState.LIVE]
        if not live:
            return None
        names = sorted({route.name for route in live})
        return StreamShape(TaskFilter(names=names), all(route.exclude_progress for route in live))

    def on_listed(
        self, routes: Sequence[Route[_Signal]], tasks: Mapping[str, Task], resume_token: str
    ) -> tuple[list[Route[_Signal]], list[Route[_Signal]]]:
        """The listing of ``routes`` came back: (routes that got their SNAPSHOT, routes not listed).

        ``resume_token`` is where the stream reopens (see "Joining" above); a route
        not listed (no such task, or the listing failed) is for the driver to look up
        alone and settle with ``on_listed`` again or ``fail``.
        """
        woken: list[Route[_Signal]] = []
        unlisted: list[Route[_Signal]] = []
        for route in routes:
            if route.state is not RouteState.LISTING:
                continue  # closed while the listing ran
            task = tasks.get(route.name)
            if task is None:
                unlisted.append(route)
                continue
            route.state = RouteState.LIVE
            self._queue(route, snapshot_event(task, resume_token))
            woken.append(route)
        return woken, unlisted

    def on_event(self, event: TaskEvent) -> list[Route[_Signal]]:
        """An event of the shared stream; returns the routes that have something new."""
        woken = []
        for route in list(self._routes.get(event.task.name, ())):
            if route.abandoned:
                self.remove(route)
                continue
            if route.state is not RouteState.LIVE or event.revision <= route.floor:
                continue
            if route.exclude_progress and event.type in _PROGRESS:
                continue
            if len(route.items) >= self._queue_limit:
                self._leave(route)
                route.state = RouteState.DETACHED
                self.changed = True
            else:
                self._queue(route, event)
            woken.append(route)
        return woken

    def fail(self, route: Route[_Signal], error: BaseException) -> None:
        """``route`` ends with ``error`` after its queue."""
        self._leave(route)
        if route.on_board:
            route.state = RouteState.FAILED
            route.error = error

    def fail_all(self, error: BaseException) -> list[Route[_Signal]]:
        """Every route on the board ends with ``error`` (the client closed, or the stream
        was refused for good); returns them."""
        routes = self._every()
        for route in routes:
            self.fail(route, error)
        return routes

    # -- inside

    def _every(self) -> list[Route[_Signal]]:
        return [route for group in self._routes.values() for route in group]

    def _queue(self, route: Route[_Signal], event: TaskEvent) -> None:
        route.items.append(event)
        route.floor = max(route.floor, event.revision)
        route.token = event.resume_token
        if event.task.state.is_terminal:
            self._leave(route)
            route.state = RouteState.ENDED

    def _leave(self, route: Route[_Signal]) -> bool:
        """Takes ``route`` off the board; True when it was on it."""
        group = self._routes.get(route.name)
        if group is None or route not in group:
            return False
        group.remove(route)
        if not group:
            del self._routes[route.name]
        return True
