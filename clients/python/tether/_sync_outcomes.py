"""The blocking client's outcome stream: :class:`OutcomeWatcher`, one per ``Client``.

It carries out what ``_outcomes.OutcomeBoard`` decides: one background thread reads
the client's single outcome stream and resolves a ``concurrent.futures.Future`` per
waiting ``result()`` (or ``map`` item); callers block on their future. The thread
starts on the first wait and ends with ``Client.close``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc

from tether import _core, _outcomes, _watch
from tether._exceptions import ResumeTokenExpired, TetherError, Unavailable
from tether._models import Task
from tether._sync_watch import ResponseStream

if TYPE_CHECKING:
    from tether._sync import Client, TaskHandle

__all__ = ["OutcomeWatcher", "map_results"]

_CLOSED = "the client was closed while waiting for the task"


class OutcomeWatcher:
    """One stream of terminal events shared by every wait of a :class:`tether.Client`.

    Thread-safe: any thread may ``begin`` a wait; the board is only touched under
    ``_lock``. See ``tether._outcomes`` for why no terminal event is lost.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._board: _outcomes.OutcomeBoard[Future[Task]] = _outcomes.OutcomeBoard()
        self._machine: _watch.WatchMachine | None = None
        self._thread: threading.Thread | None = None
        self._call: ResponseStream | None = None
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        """True while the stream's thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def mark(self) -> _outcomes.Coverage | None:
        """The coverage a submit sent now gets (None while the stream is not running)."""
        if not self.running:
            return None
        with self._lock:
            return self._board.mark()

    def start(self) -> None:
        """Starts the stream if it is not running: a fresh token first, then the thread."""
        with self._start_lock:
            if self.running:
                return
            if self._stop.is_set():
                raise TetherError(_CLOSED, code=grpc.StatusCode.CANCELLED)
            token = self._start_token()
            with self._lock:
                self._machine = _outcomes.outcome_machine(self._client._config.retry, token)
                stale = self._board.restart()  # waiters of a stream that failed before
            self._thread = threading.Thread(target=self._run, name="tether-outcomes", daemon=True)
            self._thread.start()
        self._check(stale)

    def begin(self, name: str, coverage: _outcomes.Coverage | None) -> Future[Task]:
        """A future of task ``name``'s terminal state (FULL view).

        ``coverage`` is the mark taken before the task's submit, if this client sent it.
        The caller must ``finish`` the future once it stops waiting on it.
        """
        self.start()
        future: Future[Task] = Future()
        with self._lock:
            registration = self._board.register(name, future, coverage)
        if registration.task is not None:
            future.set_result(registration.task)
        elif registration.check:
            self._check_one(name)
        return future

    def finish(self, name: str, future: Future[Task]) -> None:
        """Stops waiting on ``future`` (it may still be pending: a timeout, an abandoned map)."""
        with self._lock:
            self._board.discard(name, future)

    def close(self) -> None:
        """Ends the stream and fails every wait still pending."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        with self._lock:
            waiters = self._board.drain()
        _fail(waiters, TetherError(_CLOSED, code=grpc.StatusCode.CANCELLED))

    # -- the stream's thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                delay = self._read_once()
                if delay and self._stop.wait(delay):
                    return
        except Exception as error:  # refused for good (or a bug): every waiter learns why
            with self._lock:
                waiters = self._board.drain()
            _fail(waiters, error)

    def _read_once(self) -> float:
        """Reads the stream until it breaks; returns the delay before the next attempt."""
        machine = self._machine
        assert machine is not None
        try:
            self._call = self._client._open_stream(machine)
            if self._stop.is_set():  # close() ran before the call existed
                self._call.cancel()
            for message in self._call:
                task = _outcomes.terminal_task(machine.on_message(message))
                if task is not None:
                    self._resolve(task, from_stream=True)
            action = machine.on_end()
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return 0.0
            error = _core.error_from_rpc(exc)
            if isinstance(error, ResumeTokenExpired):
                self._restart()
                return 0.0
            action = machine.on_error(error)
        finally:
            self._call = None
        return action.delay if isinstance(action, _watch.Reconnect) else 0.0

    def _restart(self) -> None:
        """The token expired: start over from a fresh one and check every waiter."""
        backoff = _core.Backoff(self._client._config.retry)
        while True:
            try:
                token = self._start_token()
                break
            except Unavailable:
                if self._stop.wait(backoff.next_delay()):
                    return
        with self._lock:
            self._machine = _outcomes.outcome_machine(self._client._config.retry, token)
            names = self._board.restart()
        self._check(names)

    # -- plumbing

    def _start_token(self) -> str:
        response = self._client._list_page(_outcomes.start_token_request())
        return response.resume_token

    def _check(self, names: list[str]) -> None:
        for name in names:
            self._check_one(name)

    def _check_one(self, name: str) -> None:
        """Asks the server whether ``name`` already ended; resolves its waiters if so.

        UNAVAILABLE (the server restarting) is retried until it answers: a wait
        fails only with the task's own error (TaskNotFound...).
        """
        backoff = _core.Backoff(self._client._config.retry)
        while True:
            try:
                task = self._client.get(name)
                break
            except Unavailable:
                if self._stop.wait(backoff.next_delay()):
                    return
            except TetherError as error:
                with self._lock:
                    waiters = self._board.take(name)
                _fail(waiters, error)
                return
        if task.state.is_terminal:
            self._resolve(task, from_stream=False)

    def _resolve(self, task: Task, *, from_stream: bool) -> None:
        with self._lock:
            waiters = self._board.resolve(task, from_stream=from_stream)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(task)


def _fail(waiters: list[Future[Task]], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(error)


def map_results(
    watcher: OutcomeWatcher,
    submit: Callable[[Mapping[str, Any] | None], TaskHandle],
    args: Iterable[Mapping[str, Any] | None],
    *,
    ordered: bool,
    max_in_flight: int,
    return_exceptions: bool,
) -> Iterator[Any]:
    """What ``Client.map`` does: submit lazily, at most ``max_in_flight`` not yet yielded."""
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    watcher.start()  # before the first submit, so that every task is covered
    pending = iter(args)
    exhausted = False
    in_flight: dict[str, Future[Task]] = {}  # insertion order is submission order
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()
    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight:
                try:
                    item = next(pending)
                except StopIteration:
                    exhausted = True
                    break
                handle = submit(item)
                future = watcher.begin(handle.name, handle._coverage)
                in_flight[handle.name] = future
                if not ordered:
                    future.add_done_callback(_announce(finished, handle.name))
            if not in_flight:
                return
            name = next(iter(in_flight)) if ordered else finished.get()
            task = in_flight[name].result()
            watcher.finish(name, in_flight.pop(name))
            yield _core.outcome(task, return_exceptions=return_exceptions)
    finally:
        for name, future in in_flight.items():
            watcher.finish(name, future)


def _announce(names: queue.SimpleQueue[str], name: str) -> Callable[[Future[Task]], None]:
    """A done-callback that puts ``name`` on ``names`` (``map(ordered=False)``)."""
    return lambda _: names.put(name)
