"""The controller: wires the sans-IO core to the cluster, the store and the streams.

Everything runs on one asyncio loop (DESIGN §3). Each thing that happens becomes
one core event; :meth:`Controller.handle` feeds it to ``ControlCore`` and carries
out the instructions it returns: publish (log + journal + fan-out), dispatch,
signal, kill, start an engine, timers. The rooms around it each do one thing:

* ``journal``: the store writes, group-committed per loop turn; a new task is
  recorded durably *before* the core sees it, so nothing refused ever runs;
* ``history``: tasks and events that left memory, read back from the store;
* ``dispatch``: the engine side (setup, runs, signals, kills, data messages);
* ``supervision``: the reconcile loop over the hub, the engines and their
  processes, which restarts a lost cluster.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .admission import Admission, SubmitSpec
from .cluster import ClusterCallbacks, ClusterConfig, IpyparallelCluster
from .config import ServerConfig
from .core import errors as err
from .core import messages as msg
from .core.eventlog import EventLog, LogEntry, decode_token
from .core.filters import TaskFilter
from .core.machine import ALREADY_ENDED, ControlCore
from .core.model import EngineState, GracePeriods, InterruptCause, Task, TaskState
from .core.placement import unschedulable
from .core.records import snapshot
from .dispatch import EngineDriver, log_failure
from .history import TaskHistory, entry_of
from .journal import Journal
from .loads import EngineLoads
from .reattach import Reattacher
from .runtime import registry
from .store import IdempotencyRecord, SqliteStore, StoredEvent, WriteBatch
from .subscriptions import StreamOptions, SubscriberIndex, Subscription
from .supervision import Supervisor

log = logging.getLogger(__name__)

WITHDRAW_ANSWER_SECONDS = 6.0
"""How long InterruptTask waits for an engine to answer the withdrawal of a queued task
(the driver gives up after 5 s and treats the task as begun)."""


class Controller:
    """Owns the task table, the event log, the subscribers and the cluster."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = SqliteStore(
            config.data_dir / "tether.sqlite3",
            retain_events=config.retain_events,
            retain_seconds=config.retain_seconds,
            load_events=config.memory_events,
        )
        self.journal = Journal(
            self.store, on_health=lambda _ok: self._update_serving(), on_committed=self._committed
        )
        self.history = TaskHistory(self.store, self.journal, cache_size=config.task_cache)
        self.core: ControlCore | None = None
        self.log: EventLog | None = None
        self.epoch = ""
        self.cluster = IpyparallelCluster(
            ClusterConfig(
                engines=config.engines + config.spare_engines,
                profile_dir=config.data_dir / "ipython",
                heartbeat_ms=config.heartbeat_ms,
                attach_cluster_file=config.attach,
                engine_hosts=config.engine_hosts,
                ssh=config.ssh,
                cluster_ip=config.cluster_ip,
            ),
            ClusterCallbacks(
                engine_registered=self._on_engine_registered,
                engine_unregistered=self._on_engine_unregistered,
                task_message=self._on_task_message,
            ),
        )
        self.engines_driver = EngineDriver(self)
        self.reattacher = Reattacher(self)
        self.admission = Admission(self)
        self.target_engines = config.engines
        """Engines the pool should hold: this host's plus the engine hosts' slots."""
        self.loads = EngineLoads(self)
        """The engines' own load reports (GetCluster, the remote memory limit)."""
        self.supervisor = Supervisor(
            self.cluster,
            config,
            core=self.core_or_raise,
            handle=self.handle,
            cluster_state=lambda _ok: self._update_serving(),
            cluster_lost=self.engines_driver.cancel_runs,
        )
        self.listeners: list[Callable[[LogEntry], None]] = []
        """Called with every published event (metrics and other observers)."""
        self._subscribers = SubscriberIndex()
        self._timers: dict[str, list[asyncio.TimerHandle]] = collections.defaultdict(list)
        self._change_waiters: dict[str, list[asyncio.Future[None]]] = {}
        """Interrupts waiting for a change of the task (see ``_withdrawal_answered``)."""
        self._idempotency: dict[str, IdempotencyRecord] = {}
        self._requests_in_flight: dict[str, asyncio.Future[None]] = {}
        self._seq = itertools.count(1)
        self._checkpoints: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._background: set[asyncio.Future[Any]] = set()
        self._shutting_down = False
        self.ready = asyncio.Event()
        self.on_serving_changed: Callable[[bool], None] = lambda serving: None
        self._serving_reported: bool | None = None

    # ================================================================== lifecycle
    async def start(self) -> None:
        """Load the store, restore the live tasks, then start or attach to the cluster."""
        registry.load_modules(self.engines_driver.task_modules())
        loaded = await asyncio.to_thread(self.store.open)
        self.epoch = loaded.epoch
        first = loaded.events[0].revision if loaded.events else loaded.next_revision
        self.log = EventLog(
            loaded.epoch, max_events=self.config.memory_events, evicted_through=first - 1
        )
        for ev in loaded.events:
            self.log.append(entry_of(ev))
        # Remote hosts: their engine count (one per GPU by default) is known once asked.
        self.target_engines = self.config.engines + await self.cluster.plan_remote_engines()
        self.core = ControlCore(
            target_engines=self.target_engines,
            spare_engines=self.config.spare_engines,
            # Attached: a restarted controller takes up one queued attempt per engine at most.
            pipeline_depth=min(2, self.config.pipeline_depth)
            if self.config.attach
            else self.config.pipeline_depth,
            replace_lost_engines=not self.config.attach,
            default_grace=self.config.grace,
            first_revision=loaded.next_revision,
            max_output_chars=self.config.limits.max_output_chars,
            preempt_min_runtime=self.config.preempt_min_runtime,
        )
        self.history.core = self.core
        self._seq = itertools.count(loaded.next_seq)
        self._idempotency = dict(loaded.idempotency)
        # Attached: the cluster outlived the old controller, and its work may still run.
        reattach = bool(self.config.attach)
        self._execute(self.core.restore(loaded.tasks, time.time(), reattach=reattach))
        await self.journal.flush()
        await self.cluster.start()
        await self.reattacher.reconcile()
        self.supervisor.mark_cluster_up()
        self.spawn(self.supervisor.run())
        if self.config.memory_limit_bytes:
            self.spawn(self.engines_driver.resource_policy_loop())

    async def stop(self) -> None:
        """Graceful stop: interrupt running tasks, end streams, stop the cluster, close the store."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.on_serving_changed(False)
        core = self.core_or_raise()
        self.supervisor.stop()
        # Attached mode detaches: the cluster is the operator's, and what runs on it goes
        # on; the next start re-attaches to it (reattach.py).
        detach = bool(self.config.attach)
        with contextlib.suppress(Exception):
            self.handle(msg.ShutdownRequested(time.time(), detach=detach))
        deadline = time.monotonic() + 2.5
        while core.running_count and time.monotonic() < deadline and not detach:
            await asyncio.sleep(0.05)
        # Tasks that ignored SIGINT would hold their engines past the exit deadline
        # (ipyparallel's stop waits 5 s per busy engine): kill those engines now, so
        # their tasks end (INTERRUPTED, stage SIGKILL) before the streams close.
        for engine in [] if detach else list(core.engines.values()):
            if engine.current_task is not None and engine.pid:
                local_pid = self.supervisor.local_pid(engine.id)
                if local_pid:
                    with contextlib.suppress(OSError):
                        os.kill(local_pid, signal.SIGKILL)
                else:  # on another host: through its nanny
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.cluster.signal(engine.id, "SIGKILL"), 2.0)
                with contextlib.suppress(Exception):
                    self.handle(msg.EngineLost(engine.id, time.time()))
        for sub in self._subscribers:
            sub.shutdown()
        for handles in self._timers.values():
            for h in handles:
                h.cancel()
        await self.cluster.stop()
        for fut in list(self._background):
            fut.cancel()
        await self.journal.close()
        await asyncio.to_thread(self.store.close)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    # ================================================================== RPC entry points
    async def submit(self, spec: SubmitSpec) -> tuple[Task, bool]:
        """Accept a task and queue it, once its record is durable. Returns (task, deduplicated)."""
        core = self.core_or_raise()
        if self._shutting_down:
            raise err.ShuttingDown("the server is shutting down")
        if spec.request_id:
            # A retry that overtakes the first attempt waits for its answer.
            earlier = self._requests_in_flight.get(spec.request_id)
            if earlier is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(earlier)
        dedup = self._check_idempotency(spec.request_id, "SubmitTask", spec.fingerprint)
        if dedup is not None:
            return _public_copy(await self._task_or_raise(dedup)), True
        await self.admission.check(spec)
        task = self.admission.new_task(spec, time.time(), next(self._seq))
        record = WriteBatch(tasks=[task])
        key = None
        if spec.request_id:
            now = task.create_time
            key = IdempotencyRecord(spec.request_id, "SubmitTask", spec.fingerprint, task.id, now)
            record.idempotency.append(key)
        in_flight: asyncio.Future[None] | None = None
        if key is not None:
            in_flight = asyncio.get_running_loop().create_future()
            self._requests_in_flight[key.key] = in_flight
        try:
            # Durable first: a refused write leaves no trace, and nothing of it runs.
            await self.journal.record_new(record)
            if key is not None:
                self._idempotency[key.key] = key
        finally:
            if key is not None and in_flight is not None:
                in_flight.set_result(None)
                self._requests_in_flight.pop(key.key, None)
        answer = _public_copy(task)
        if core.shutting_down:
            return answer, False  # recorded PENDING: it runs after the restart
        self.handle(msg.TaskSubmitted(task, time.time()))
        return answer, False

    async def interrupt(
        self,
        task_id: str,
        *,
        reason: str,
        grace: GracePeriods | None,
        request_id: str = "",
        fingerprint: str = "",
        principal: str = "anonymous",
        admin: bool = True,
    ) -> tuple[Task, bool]:
        dedup = self._check_idempotency(request_id, "InterruptTask", fingerprint)
        if dedup is not None:
            return _public_copy(await self._task_or_raise(dedup)), True
        task = await self._task_or_raise(task_id)
        owner = task.owner
        if not admin and owner != principal:
            raise err.PermissionDenied(
                f"{principal} may not interrupt tasks/{task_id}, owned by {owner}",
                metadata={"name": f"tasks/{task_id}", "principal": principal, "owner": owner},
            )
        core = self.core_or_raise()
        now = time.time()
        if task_id in core.tasks:
            self.handle(
                msg.InterruptRequested(
                    task_id,
                    requested_by=principal,
                    reason=reason,
                    cause=InterruptCause.USER,
                    now=now,
                    grace=grace,
                )
            )
            await self._withdrawal_answered(task_id)
        elif task.state in ALREADY_ENDED:
            raise err.TaskAlreadyTerminal(
                f"task {task.name} already ended {task.state.name}; there is nothing to interrupt",
                metadata={"name": task.name, "state": f"TASK_STATE_{task.state.name}"},
            )
        if request_id:
            rec = IdempotencyRecord(request_id, "InterruptTask", fingerprint, task_id, now)
            self._idempotency[request_id] = rec
            self.journal.batch().idempotency.append(rec)
        await self.journal.flush()
        return _public_copy(await self._task_or_raise(task_id)), False

    async def _withdrawal_answered(self, task_id: str) -> None:
        """A task queued on an engine is cancelled once the engine answers (milliseconds):
        wait for it, so that InterruptTask answers CANCELLED as for any pending task."""
        core = self.core_or_raise()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHDRAW_ANSWER_SECONDS
        while core.withdrawal_pending(task_id) and loop.time() < deadline:
            changed = loop.create_future()
            self._change_waiters.setdefault(task_id, []).append(changed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed, timeout=deadline - loop.time())

    async def get(self, task_id: str) -> Task:
        return await self._task_or_raise(task_id)

    async def list_tasks(
        self, flt: TaskFilter, after_seq: int, limit: int
    ) -> tuple[list[Task], int | None]:
        """Tasks with seq > after_seq matching the filter; returns (page, last seq or None at the end)."""
        return await self.history.list(flt, after_seq, limit)

    @property
    def latest_revision(self) -> int:
        return self.core_or_raise().next_revision - 1

    async def subscribe(
        self,
        *,
        task_id: str | None,
        flt: TaskFilter,
        resume_token: str,
        send_initial_state: bool,
        exclude_progress: bool,
        full_view: bool,
        principal: str = "anonymous",
    ) -> Subscription:
        """Open a subscription with no gap and no duplicate.

        The subscriber is registered for live events in the same loop turn as the
        memory log is read, so every newer event lands exactly once, either in the
        replay or in the live queue. History the memory log no longer holds (an old
        resume token, the initial state of finished tasks) is read from the store
        first, as the stream's ``prefix``.
        """
        if self._shutting_down:
            raise err.ShuttingDown("the server is shutting down")
        self._check_stream_limits(principal)
        eventlog = self._eventlog()
        single: Task | None = None
        if task_id is not None:
            single = await self._task_or_raise(task_id)
        options = StreamOptions(task_id, flt, exclude_progress, full_view)
        probe = Subscription(options, 0, [])
        prefix: AsyncIterator[Any] | None = None
        if resume_token:
            revision = decode_token(resume_token, epoch=self.epoch)
            if revision < eventlog.evicted_through:
                if not await self.history.stored_since(revision):
                    eventlog.since(revision)  # raises RESUME_TOKEN_EXPIRED, cause expired
                through = eventlog.evicted_through
                prefix = _wanted(probe, self.history.replay(revision, through=through))
                revision = through
            initial: list[Any] = [e for e in eventlog.since(revision) if probe.wants(e)]
        elif single is not None:
            initial = [("snapshot", _public_copy(single), self.latest_revision)]
        elif send_initial_state:
            prefix = _snapshots(self.history.matching(flt), self.latest_revision)
            initial = [("initial_done", None, self.latest_revision)]
        else:
            initial = []
        self._check_stream_limits(principal)  # the awaits above let others in
        sub = Subscription(options, self.config.limits.subscriber_queue, initial, principal)
        sub.prefix = prefix
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def engines(self) -> list[Any]:
        return sorted(self.core_or_raise().engines.values(), key=lambda e: e.id)

    @property
    def pending_count(self) -> int:
        return self.core_or_raise().queue_length

    @property
    def running_count(self) -> int:
        return self.core_or_raise().running_count

    @property
    def serving(self) -> bool:
        """Whether tether can take and run work: store writable, cluster up, an engine ready."""
        core = self.core
        if self._shutting_down or core is None:
            return False
        return (
            self.journal.healthy
            and self.supervisor.cluster_ok
            and any(e.state in (EngineState.IDLE, EngineState.BUSY) for e in core.engines.values())
        )

    @property
    def problem(self) -> str:
        """Why tether is not serving, in words ("" when it is)."""
        if self.serving:
            return ""
        if self._shutting_down:
            return "the server is shutting down"
        if not self.journal.healthy:
            return f"the store cannot write: {self.journal.last_error}"
        if not self.supervisor.cluster_ok:
            return "the ipyparallel controller is lost; restarting the cluster"
        return "no engine is ready yet"

    # ================================================================== core driving
    def core_or_raise(self) -> ControlCore:
        if self.core is None:
            raise err.ShuttingDown("the controller is not started")
        return self.core

    def _eventlog(self) -> EventLog:
        assert self.log is not None
        return self.log

    def handle(self, event: msg.Event) -> None:
        """Feed one event to the core and carry out what it says."""
        self._execute(self.core_or_raise().handle(event))

    def _execute(self, instructions: list[msg.Instruction]) -> None:
        driver = self.engines_driver
        for ins in instructions:
            if isinstance(ins, msg.Publish):
                self._publish(ins)
            elif isinstance(ins, msg.Dispatch):
                driver.dispatch(ins.task_id, ins.attempt, ins.engine_id)
            elif isinstance(ins, msg.SignalEngine):
                self.spawn(driver.signal(ins.engine_id, ins.signal, ins.task_id, ins.attempt))
            elif isinstance(ins, msg.KillEngine):
                self.spawn(driver.kill(ins.engine_id, ins.reason))
            elif isinstance(ins, msg.StartEngine):
                self.spawn(driver.start_engine(ins.replaces))
            elif isinstance(ins, msg.Withdraw):
                self.spawn(driver.withdraw(ins.engine_id, ins.task_id, ins.attempt))
            elif isinstance(ins, msg.StartTimer):
                self._start_timer(ins.key, ins.delay)
            elif isinstance(ins, msg.CancelTimers):
                for h in self._timers.pop(ins.task_id, []):
                    h.cancel()
        driver.flush()  # the dispatches leave now, one request per engine
        self._update_serving()

    def _publish(self, p: msg.Publish) -> None:
        # payload: a one-slot cell the stream fills with the serialized message, once.
        entry = LogEntry(p.revision, p.kind, p.task, p.time, p.chunk, [None])
        self._eventlog().append(entry)
        batch = self.journal.batch()
        batch.events.append(
            StoredEvent(p.revision, p.kind.value, p.task.id, p.time, p.chunk, p.task)
        )
        if p.kind is not msg.EventKind.OUTPUT:
            batch.tasks.append(p.task)
        if p.kind is msg.EventKind.STATE_CHANGED and p.task.state.terminal:
            self.history.remember(p.task)
        if self._change_waiters:
            for waiter in self._change_waiters.pop(p.task.id, ()):
                if not waiter.done():
                    waiter.set_result(None)
        self._subscribers.deliver(entry)
        for listener in self.listeners:
            listener(entry)

    def _committed(self, batch: WriteBatch) -> None:
        """A batch is on disk: finished tasks in it may leave the core's table now."""
        core = self.core
        if core is None:
            return
        for task in batch.tasks:
            if task.state.terminal:
                core.forget(task.id)

    def _start_timer(self, key: msg.TimerKey, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, delay), self._fire_timer, key)
        self._timers[key.task_id].append(handle)

    def _fire_timer(self, key: msg.TimerKey) -> None:
        self.handle(msg.TimerFired(key, time.time()))

    # ================================================================== cluster side
    def spawn(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        fut.add_done_callback(log_failure)

    def _on_engine_registered(self, engine_id: int) -> None:
        if self._shutting_down:
            return
        self.handle(msg.EngineRegistered(engine_id, time.time()))
        self.spawn(self.engines_driver.setup_engine(engine_id))

    def _on_engine_unregistered(self, engine_id: int) -> None:
        if self._shutting_down:
            return
        self.handle(msg.EngineLost(engine_id, time.time()))

    def _on_task_message(self, task_id: str, attempt: int, kind: str, payload: Any) -> None:
        self.engines_driver.on_task_message(task_id, attempt, kind, payload)

    def save_checkpoint(self, task_id: str, text: str) -> None:
        self._checkpoints[task_id] = text
        self._checkpoints.move_to_end(task_id)
        while len(self._checkpoints) > 1000:
            self._checkpoints.popitem(last=False)
        self.journal.batch().checkpoints.append((task_id, text))

    async def checkpoint_text(self, task_id: str) -> str | None:
        text = self._checkpoints.get(task_id)
        if text is None:
            text = await asyncio.to_thread(self.store.get_checkpoint, task_id)
        return text

    # ================================================================== policies
    def unschedulable_tasks(self) -> list[Task]:
        """PENDING tasks whose tags no engine that is there now carries (GetCluster)."""
        core = self.core_or_raise()
        return unschedulable(core.tasks.values(), core.engines.values())

    # ================================================================== helpers
    async def _task_or_raise(self, task_id: str) -> Task:
        task = await self.history.get(task_id)
        if task is None:
            raise err.TaskNotFound(
                f"task tasks/{task_id} does not exist", metadata={"name": f"tasks/{task_id}"}
            )
        return task

    def _check_stream_limits(self, principal: str) -> None:
        limits = self.config.limits
        if len(self._subscribers) >= limits.max_subscribers:
            raise err.ResourceExhausted(
                "too many subscribers",
                metadata={"maxSubscribers": str(limits.max_subscribers)},
            )
        if self._subscribers.count_of(principal) >= limits.max_subscribers_per_principal:
            raise err.ResourceExhausted(
                f"{principal} has {limits.max_subscribers_per_principal} open streams already",
                metadata={
                    "principal": principal,
                    "maxSubscribersPerPrincipal": str(limits.max_subscribers_per_principal),
                },
            )

    def _check_idempotency(self, request_id: str, method: str, fingerprint: str) -> str | None:
        if not request_id:
            return None
        rec = self._idempotency.get(request_id)
        if rec is None:
            return None
        if rec.method != method or rec.fingerprint != fingerprint:
            raise err.RequestIdReused(
                f"request_id {request_id!r} was used before with a different request",
                metadata={"requestId": request_id, "method": rec.method},
            )
        return rec.task_id

    def _update_serving(self) -> None:
        """Tell the health side when ``serving`` changes (it runs after every batch of
        instructions: only a change costs anything)."""
        if self._shutting_down or self.core is None:
            return
        serving = self.serving
        if serving != self._serving_reported:
            self._serving_reported = serving
            self.on_serving_changed(serving)


async def _wanted(sub: Subscription, entries: AsyncIterator[LogEntry]) -> AsyncIterator[Any]:
    async for entry in entries:
        if sub.wants(entry):
            yield entry


async def _snapshots(tasks: AsyncIterator[Task], revision: int) -> AsyncIterator[Any]:
    async for task in tasks:
        yield ("snapshot", task, revision)


def _public_copy(task: Task) -> Task:
    """The task as handed to the API: a snapshot later changes cannot alter."""
    return snapshot(task, keep_output=True)


__all__ = ["Controller", "SubmitSpec", "TaskState"]
