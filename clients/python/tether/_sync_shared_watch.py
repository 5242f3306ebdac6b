"""The blocking client's shared watch stream: :class:`SharedWatcher` and :class:`HandleWatch`.

``SharedWatcher`` (one per ``Client``) carries out what
``_shared_watch.SharedWatchBoard`` decides: one background thread reads the
client's shared watch stream, lists the tasks whose watches join it, and queues
each event for the watches of its task. ``HandleWatch`` is what
``TaskHandle.watch`` returns: an iterator over its route's queue that blocks on a
condition of its own, and goes on over a single-task stream of its own if it
ever has to leave the shared one. The thread starts with the first watch and
ends with ``Client.close``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import grpc

from tether import _core, _shared_watch, _watch
from tether._exceptions import TetherError, Unavailable
from tether._models import Task, TaskEvent
from tether._shared_watch import HandleWatchPlace, Join, Route, RouteState, SharedWatchBoard
from tether._sync_watch import ResponseStream, TaskWatch, carry_out
from tether.v1.task_service_pb2 import ListTasksResponse

if TYPE_CHECKING:
    from tether._sync import Client

__all__ = ["HandleWatch", "SharedWatcher"]

_Route = Route[threading.Condition]


class SharedWatcher:
    """One stream of names shared by every ``TaskHandle.watch`` of a :class:`tether.Client`.

    Thread-safe: any thread may add, drain or remove a route; the board is only
    touched under ``_lock``. See ``tether._shared_watch`` for why what each watch
    yields is what a single-task stream would have yielded.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        """The thread waits here while no route is on the board."""
        self._board: SharedWatchBoard[threading.Condition] = SharedWatchBoard()
        """Each route's signal is a condition of its own on ``_lock``."""
        self._machine: _watch.WatchMachine | None = None
        self._call: ResponseStream | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def add(self, name: str, *, exclude_progress: bool) -> _Route:
        """A new watch of task ``name``: it joins the stream, or starts DETACHED."""
        with self._lock:
            if self._stop.is_set():
                raise _shared_watch.closed_error()
            signal = threading.Condition(self._lock)
            route = self._board.add(name, signal, exclude_progress=exclude_progress)
            if route.state is RouteState.DETACHED:
                return route
            self._reopen()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tether-watches", daemon=True
                )
                self._thread.start()
        return route

    def next_item(self, route: _Route) -> TaskEvent | RouteState:
        """Blocks for ``route``'s next event, or the state it ended in (see ``settle``)."""
        with self._lock:
            while not route.items and route.on_board:
                route.signal.wait()
            if route.items:
                return route.items.popleft()
        return _shared_watch.settle(route)

    def remove(self, route: _Route) -> None:
        """The consumer closed its watch: ``route`` leaves (a blocked consumer stops)."""
        with self._lock:
            self._board.remove(route)
            self._reopen()
            route.signal.notify_all()

    def close(self) -> None:
        """Ends the stream; every watch on it raises TetherError (CANCELLED)."""
        with self._lock:
            self._stop.set()
            if self._call is not None:
                self._call.cancel()
            self._changed.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self._fail_all(_shared_watch.closed_error())

    # -- the stream's thread

    def _run(self) -> None:
        backoff = _core.Backoff(self._client._config.retry)
        try:
            while True:
                with self._lock:
                    while self._board.empty and not self._stop.is_set():
                        self._machine = None  # the next stream starts from a fresh listing
                        self._changed.wait()
                    if self._stop.is_set():
                        return
                    joining = self._board.joining()
                try:
                    self._join(joining)
                except Unavailable:
                    with self._lock:
                        self._board.changed = True  # the joining routes are still to list
                    if self._stop.wait(backoff.next_delay()):
                        return
                    continue
                backoff.reset()
                with self._lock:
                    shape = None if self._board.changed else self._board.shape()
                if shape is not None and self._machine is not None:
                    self._machine.retarget(
                        shape.task_filter, exclude_progress=shape.exclude_progress
                    )
                    self._read(self._machine)
        except Exception as error:  # refused for good (or a bug): every watch learns why
            self._machine = None
            self._fail_all(error)

    def _join(self, routes: list[_Route]) -> None:
        """Lists the joining ``routes`` and queues their snapshots (``Join`` decides)."""
        machine = self._machine
        join = Join(self._board, routes, machine.resume_token if machine else None)
        while (call := join.next_call()) is not None:
            try:
                if isinstance(call, str):
                    answer: Task | ListTasksResponse = self._client.get(
                        call, view=_shared_watch.SNAPSHOT_VIEW
                    )
                else:
                    answer = self._client._list_page(call)
            except Unavailable:
                raise
            except TetherError as error:
                with self._lock:
                    self._wake(join.on_error(error))
            else:
                with self._lock:
                    self._wake(join.on_answer(answer))
        if machine is None and join.resume_token is not None:
            self._machine = _shared_watch.shared_machine(
                self._client._config.retry, join.resume_token
            )

    def _read(self, machine: _watch.WatchMachine) -> None:
        """Reads the stream until it breaks or no longer fits the board, then does what
        the machine decides (re-list, wait before reconnecting)."""
        call = self._client._open_stream(machine)
        with self._lock:
            self._call = call
            if self._done_with():
                call.cancel()
        try:
            for message in call:
                item = machine.on_message(message)
                with self._lock:
                    if isinstance(item, TaskEvent):
                        self._wake(self._board.on_event(item))
                    if self._done_with():
                        call.cancel()
            action = machine.on_end()
        except grpc.RpcError as exc:
            with self._lock:
                ours = self._done_with()
            if ours and exc.code() == grpc.StatusCode.CANCELLED:
                return
            action = machine.on_error(_core.error_from_rpc(exc))
        finally:
            with self._lock:
                self._call = None
        carry_out(self._client, machine, action, self._route_events, sleep=self._stop.wait)

    # -- plumbing

    def _done_with(self) -> bool:
        """With the lock held: the open stream must go (closing, reopening, or no watch left)."""
        return self._stop.is_set() or self._board.changed or self._board.empty

    def _route_events(self, events: list[TaskEvent]) -> None:
        with self._lock:
            for event in events:
                self._wake(self._board.on_event(event))

    def _reopen(self) -> None:
        """With the lock held: if the board changed, the thread reopens the stream."""
        if self._board.changed:
            if self._call is not None:
                self._call.cancel()
            self._changed.notify_all()

    def _wake(self, routes: list[_Route]) -> None:
        for route in routes:
            route.signal.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._wake(self._board.fail_all(error))


class HandleWatch(TaskWatch[TaskEvent]):
    """What ``TaskHandle.watch`` returns: the task's events over the client's shared stream.

    It joins the stream on the first ``next``. If it ever falls ``QUEUE_LIMIT`` events
    behind (or the stream already follows as many tasks as it may), it continues over
    a single-task stream of its own, from where its queue ended: the events are the
    same either way.
    """

    def __init__(
        self, client: Client, machine: _watch.WatchMachine, *, name: str, exclude_progress: bool
    ) -> None:
        super().__init__(client, machine)
        self._name = name
        self._exclude_progress = exclude_progress
        self._place: HandleWatchPlace[threading.Condition] = HandleWatchPlace(machine)

    @property
    def resume_token(self) -> str:
        """Token of the last event yielded (from the shared stream) or received."""
        return self._place.resume_token

    def __next__(self) -> TaskEvent:
        place, watches = self._place, self._client._watches
        if not place.own_stream:
            if self._closed:
                raise StopIteration
            if place.route is None:
                place.joined(self, watches.add(self._name, exclude_progress=self._exclude_progress))
            assert place.route is not None
            event = place.take(watches.next_item(place.route))
            if event is not None:
                return event
            if not place.own_stream:
                self.close()
                raise StopIteration
        return super().__next__()

    def close(self) -> None:
        """Ends the watch; iteration stops."""
        place = self._place
        if place.route is not None and not place.own_stream:
            self._client._watches.remove(place.route)
        super().close()
