"""The resumable watch, decided without I/O: :class:`WatchMachine`.

``Client.watch``, ``AsyncClient.watch`` and the task handles' ``watch`` and
``result`` drive one of these each: they open the stream it asks for, hand it
every message, error and end of stream, and carry out the action it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tether import _convert
from tether._convert import Seconds
from tether._core import Backoff, RetryPolicy, list_request, task_name, view_proto, wait_ran_out
from tether._exceptions import ResumeTokenExpired, TetherError, Unavailable
from tether._models import Checkpoint, Task, TaskEvent, TaskFilter, TaskState, TaskView
from tether.v1 import task_pb2, task_service_pb2


@dataclass(frozen=True)
class Reconnect:
    """Open the stream again (``WatchMachine.stream_request``) after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Relist:
    """Re-list the matching tasks after ``delay`` seconds, then reconnect.

    The driver sends ``list_request(page_token)`` page by page, hands each page to
    ``on_list_page`` (yielding what it returns) and calls ``finish_relist``.
    """

    delay: float


@dataclass(frozen=True)
class Finished:
    """The watch is over (a single task reached its terminal state)."""


WatchAction = Reconnect | Relist | Finished


@dataclass
class _SnapshotMemory:
    """Revisions of tasks sent as SNAPSHOT events that later events may repeat."""

    revisions: dict[str, int] = field(default_factory=dict)
    ceiling: int = 0

    def add(self, name: str, revision: int) -> None:
        self.revisions[name] = revision
        self.ceiling = max(self.ceiling, revision)

    def covers(self, name: str, revision: int) -> bool:
        return self.revisions.get(name, -1) >= revision

    def passed(self, revision: int) -> None:
        """Forget everything once the stream is past every remembered revision."""
        if revision >= self.ceiling:
            self.revisions.clear()
            self.ceiling = 0


class WatchMachine:
    """Decides everything a resumable watch does; the drivers only do the I/O.

    Guarantees, whatever the server or the network does:

    * **Resumption.** The stream is reopened after UNAVAILABLE (server restarting,
      shutting down, a lagging subscriber cut off) or an unexpected end, from the
      resume token of the last message received, after a capped exponential backoff
      that goes back to its start once a message arrives.
    * **No duplicates, in order.** An event is yielded only if its revision is above
      every revision yielded so far; checkpoints advance the token and that floor
      too, and are yielded only when asked for.
    * **Expired tokens.** OUT_OF_RANGE / RESUME_TOKEN_EXPIRED means the log no longer
      reaches back to the token. A filter watch then re-lists the matching tasks
      with ``ListTasks``, yields a SNAPSHOT event for each task whose revision is
      above what it already yielded, and continues from the token the listing
      returned. A single-task watch asks the stream for the task's initial state
      instead. Events replayed after a snapshot that the snapshot already showed are
      dropped. Changes that happened inside the gap are not replayed one by one:
      the snapshots carry their outcome.
    * **Initial state.** With ``send_initial_state`` the server first sends a SNAPSHOT
      per matching task and a checkpoint marking their end. If the stream breaks
      before that checkpoint, the watch asks for the initial state again from its
      starting token and skips the snapshots it already yielded.
    """

    def __init__(
        self,
        *,
        policy: RetryPolicy,
        name: str | None = None,
        task_filter: TaskFilter | None = None,
        resume_token: str | None = None,
        send_initial_state: bool = False,
        view: TaskView | None = None,
        exclude_progress: bool = False,
        yield_checkpoints: bool = False,
        deadline: float | None = None,
    ) -> None:
        if name is not None and task_filter is not None:
            raise ValueError("watch one task by name or many by filter, not both")
        self._name = task_name(name) if name is not None else None
        self._filter = task_filter
        self._view = view
        self._exclude_progress = exclude_progress
        self._yield_checkpoints = yield_checkpoints
        self._deadline = deadline
        self._backoff = Backoff(policy)
        self._token = resume_token or ""
        self._initial_pending = send_initial_state
        self._initial_token = self._token
        self._last_revision = 0
        self._snapshots = _SnapshotMemory()
        self._relist_token: str | None = None
        self.finished = False
        """True once a single-task watch yielded its task's terminal event."""

    @property
    def resume_token(self) -> str:
        """Token of the last message received; resuming from it loses and repeats nothing."""
        return self._token

    def retarget(self, task_filter: TaskFilter, *, exclude_progress: bool) -> None:
        """The next stream covers ``task_filter`` instead, from the same token.

        The client's shared watch (``tether._shared_watch``) changes the names it
        follows this way; it makes sure every task the new filter adds is covered
        from the token on (by a listing made after that token).
        """
        self._filter = task_filter
        self._exclude_progress = exclude_progress

    def resume_after(self, resume_token: str, revision: int) -> None:
        """Continue strictly after ``resume_token``, skipping revisions up to ``revision``.

        For a single-task watch that has already yielded the task up to
        ``revision`` elsewhere (the client's shared watch stream): no SNAPSHOT
        comes first, and no event is yielded twice.
        """
        self._token = resume_token
        self._initial_pending = False
        self._last_revision = max(self._last_revision, revision)

    # -- requests

    def stream_request(self) -> task_service_pb2.StreamTaskStatusRequest:
        request = task_service_pb2.StreamTaskStatusRequest(
            name=self._name or "",
            resume_token=self._initial_token if self._initial_pending else self._token,
            send_initial_state=self._initial_pending,
            view=view_proto(self._view),
            exclude_progress=self._exclude_progress,
        )
        proto_filter = _convert.filter_proto(self._filter)
        if proto_filter is not None:
            request.filter.CopyFrom(proto_filter)
        return request

    def stream_timeout(self) -> float | None:
        """Deadline of the next stream call, when the watch has one (``result(timeout=...)``)."""
        if self._deadline is None:
            return None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise wait_ran_out()
        return remaining

    def list_request(self, page_token: str) -> task_service_pb2.ListTasksRequest:
        request = list_request(self._filter, None, self._view)
        request.page_token = page_token
        return request

    # -- what arrives

    def on_message(
        self, message: task_service_pb2.StreamTaskStatusResponse
    ) -> TaskEvent | Checkpoint | None:
        """Accounts for one stream message; returns what to yield, if anything."""
        self._backoff.reset()
        self._token = message.resume_token or self._token
        kind = message.WhichOneof("event")
        if kind == "checkpoint":
            return self._on_checkpoint(message.checkpoint, message.resume_token)
        if kind == "task_event":
            return self._on_event(message.task_event, message.resume_token)
        return None  # a kind newer than this client: the token still advanced

    def _on_checkpoint(
        self, checkpoint: task_service_pb2.StreamCheckpoint, token: str
    ) -> Checkpoint | None:
        if checkpoint.initial_state_complete:
            self._initial_pending = False
        self._last_revision = max(self._last_revision, checkpoint.revision)
        self._snapshots.passed(checkpoint.revision)
        if not self._yield_checkpoints:
            return None
        return _convert.checkpoint_from_proto(checkpoint, token)

    def _on_event(self, event: task_service_pb2.TaskEvent, token: str) -> TaskEvent | None:
        name, revision = event.task.name, event.revision
        if event.type == task_service_pb2.TASK_EVENT_TYPE_SNAPSHOT:
            if revision <= self._last_revision or self._snapshots.covers(name, revision):
                return None
            self._snapshots.add(name, revision)
        else:
            # A live event ends the initial state even if its checkpoint went missing.
            self._initial_pending = False
            if revision <= self._last_revision:
                return None
            self._last_revision = revision
            if self._snapshots.covers(name, revision):
                return None
            self._snapshots.passed(revision)
        converted = _convert.event_from_proto(event, token)
        if self._name is not None and converted.task.state.is_terminal:
            self.finished = True
        return converted

    def on_end(self) -> WatchAction:
        """The stream ended with OK."""
        if self.finished:
            return Finished()
        # A filter stream never ends on its own; a single-task one ends after its
        # terminal event. Anything else (a proxy, a graceful restart): resume.
        return Reconnect(self._delay())

    def on_error(self, error: TetherError) -> WatchAction:
        """The stream failed with ``error``; raises it when the watch cannot go on."""
        if isinstance(error, ResumeTokenExpired):
            if self._name is not None:
                self._token = self._initial_token = ""
                self._initial_pending = True
                return Reconnect(self._delay())
            return Relist(self._delay())
        if isinstance(error, Unavailable):
            return Reconnect(self._delay())
        raise error

    def on_relist_error(self, error: TetherError) -> WatchAction:
        """A ``ListTasks`` page of a re-list failed: try the whole re-list again, or raise."""
        if isinstance(error, Unavailable):
            return Relist(self._delay())
        raise error

    def on_list_page(self, response: task_service_pb2.ListTasksResponse) -> list[TaskEvent]:
        """SNAPSHOT events for the tasks of one page that the caller has not seen yet."""
        if self._relist_token is None:
            # Watch from the first page's token: changes made while later pages were
            # listed are replayed, and those the snapshots already show are dropped.
            self._relist_token = response.resume_token
        events = []
        for message in response.tasks:
            if message.revision <= self._last_revision or self._snapshots.covers(
                message.name, message.revision
            ):
                continue
            self._snapshots.add(message.name, message.revision)
            events.append(
                _convert.snapshot_event(_convert.task_from_proto(message), self._relist_token)
            )
        return events

    def finish_relist(self) -> Reconnect:
        self._token = self._relist_token or ""
        self._relist_token = None
        self._initial_pending = False
        return Reconnect(0.0)

    def abandon_relist(self) -> None:
        """A re-list failed midway; the next one starts from its first page again."""
        self._relist_token = None

    def _delay(self) -> float:
        delay = self._backoff.next_delay()
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise wait_ran_out()
        return delay


class TaskHandleBase:
    """What ``TaskHandle`` and ``AsyncTaskHandle`` share: identity and their watches."""

    def __init__(
        self,
        name: str,
        *,
        submitted: Task | task_pb2.Task | None,
        deduplicated: bool,
    ) -> None:
        self.name = name
        """The task's resource name, ``"tasks/{id}"``."""
        # SubmitTask's message is converted when ``submitted`` is first read: most
        # programs only wait for the result (a conversion was 7 % of a client's CPU).
        self._submitted = submitted
        self.deduplicated = deduplicated
        """True when the request_id matched an earlier submit and no new task was made."""

    @property
    def submitted(self) -> Task | None:
        """The task as SubmitTask returned it; None for ``get_handle``."""
        if isinstance(self._submitted, task_pb2.Task):
            self._submitted = _convert.task_from_proto(self._submitted)
        return self._submitted

    @property
    def id(self) -> str:
        """The id part of the name."""
        return self.name.removeprefix("tasks/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _known_terminal(self) -> bool:
        """True when the task was already over when this client last saw it."""
        submitted = self._submitted  # not converted for this (see ``submitted``)
        if submitted is None:
            return False
        if isinstance(submitted, task_pb2.Task):
            return _convert.enum_from_proto(TaskState, submitted.state).is_terminal
        return submitted.state.is_terminal

    def _watch_machine(
        self, policy: RetryPolicy, exclude_progress: bool, timeout: Seconds | None
    ) -> WatchMachine:
        """A watch of this task from its current state (a SNAPSHOT) to its terminal event."""
        deadline = None
        if timeout is not None:
            deadline = time.monotonic() + _convert.to_timedelta(timeout).total_seconds()
        return WatchMachine(
            policy=policy,
            name=self.name,
            send_initial_state=True,
            exclude_progress=exclude_progress,
            deadline=deadline,
        )
