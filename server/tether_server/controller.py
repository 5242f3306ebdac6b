"""The controller: wires the sans-IO core to the cluster, the store and the streams.

Everything runs on one asyncio loop (DESIGN §3). Each thing that happens becomes
one core event; ``_handle`` feeds it to ``ControlCore`` and carries out the
instructions it returns: publish (log + store + fan-out), dispatch, signal,
kill, start an engine, timers. Store writes of one loop turn are coalesced
into one batch; a submit returns only after its batch is committed, so an
accepted task survives a crash.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cluster import ClusterCallbacks, ClusterConfig, EngineDied, IpyparallelCluster
from .config import ServerConfig
from .core import errors as err
from .core import messages as msg
from .core.eventlog import EventLog, LogEntry, decode_token
from .core.filters import TaskFilter
from .core.machine import ControlCore
from .core.model import (
    EngineState,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    Task,
    TaskState,
)
from .core.records import snapshot
from .runtime import registry
from .store import IdempotencyRecord, SqliteStore, StoredEvent, WriteBatch
from .subscriptions import StreamOptions, SubscriberIndex, Subscription

log = logging.getLogger(__name__)

_STAGES = {"SIGINT": EscalationStage.SIGINT, "SIGTERM": EscalationStage.SIGTERM}


@dataclass(slots=True)
class SubmitSpec:
    """A validated SubmitTask request in domain terms."""

    task: str
    args: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    timeout: float | None = None
    queue_timeout: float | None = None
    grace: GracePeriods | None = None
    request_id: str = ""
    fingerprint: str = ""
    resume_from: str = ""
    required_tags: tuple[str, ...] = ()
    owner: str = "anonymous"


class Controller:
    """Owns the task table, the event log, the subscribers and the cluster."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = SqliteStore(
            config.data_dir / "tether.sqlite3",
            retain_events=config.retain_events,
            retain_seconds=config.retain_seconds,
        )
        self.core: ControlCore | None = None
        self.log: EventLog | None = None
        self.epoch = ""
        self.cluster = IpyparallelCluster(
            ClusterConfig(
                engines=config.engines,
                profile_dir=config.data_dir / "ipython",
                heartbeat_ms=config.heartbeat_ms,
                attach_cluster_file=config.attach,
            ),
            ClusterCallbacks(
                engine_registered=self._on_engine_registered,
                engine_unregistered=self._on_engine_unregistered,
                task_message=self._on_task_message,
            ),
        )
        self._subscribers = SubscriberIndex()
        self._timers: dict[str, list[asyncio.TimerHandle]] = collections.defaultdict(list)
        self._batch: WriteBatch | None = None
        self._batch_future: asyncio.Future[None] | None = None
        self._idempotency: dict[str, IdempotencyRecord] = {}
        self._order: list[tuple[int, str]] = []
        self._seq = itertools.count(1)
        self._checkpoints: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._background: set[asyncio.Future[Any]] = set()
        self._received: dict[tuple[str, int], int] = {}
        self._message_waiters: dict[tuple[str, int], tuple[int, asyncio.Future[None]]] = {}
        self._shutting_down = False
        self.ready = asyncio.Event()
        self.on_serving_changed: Callable[[bool], None] = lambda serving: None

    # ================================================================== lifecycle
    async def start(self) -> None:
        """Load the store, restore the tables, then start or attach to the cluster."""
        registry.load_modules(self._task_modules())
        loaded = await asyncio.to_thread(self.store.open)
        self.epoch = loaded.epoch
        first = loaded.events[0].revision if loaded.events else loaded.next_revision
        self.log = EventLog(
            loaded.epoch, max_events=self.config.retain_events, evicted_through=first - 1
        )
        for ev in loaded.events:
            self.log.append(
                LogEntry(ev.revision, msg.EventKind(ev.kind), ev.task, ev.time, ev.chunk, [None])
            )
        self.core = ControlCore(
            target_engines=self.config.engines,
            replace_lost_engines=not self.config.attach,
            default_grace=self.config.grace,
            first_revision=loaded.next_revision,
            max_output_chars=self.config.limits.max_output_chars,
        )
        self._seq = itertools.count(loaded.next_seq)
        self._idempotency = dict(loaded.idempotency)
        self._order = [(t.seq, t.id) for t in loaded.tasks]
        self._execute(self.core.restore(loaded.tasks, time.time()))
        await self._flush_now()
        await self.cluster.start()
        if self.config.memory_limit_bytes:
            self._spawn(self._resource_policy_loop())

    async def stop(self) -> None:
        """Graceful stop: interrupt running tasks, end streams, stop the cluster, close the store."""
        if self._shutting_down:
            return
        self._shutting_down = True
        self.on_serving_changed(False)
        core = self._core()
        with contextlib.suppress(Exception):
            self._handle(msg.ShutdownRequested(time.time()))
        deadline = time.monotonic() + 3.0
        while core.running_count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Tasks that ignored SIGINT would hold their engines past the exit deadline
        # (ipyparallel's stop waits 5 s per busy engine): kill those engines now, so
        # their tasks end (INTERRUPTED, stage SIGKILL) before the streams close.
        for engine in list(core.engines.values()):
            if engine.current_task is not None and engine.pid:
                with contextlib.suppress(OSError):
                    os.kill(engine.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    self._handle(msg.EngineLost(engine.id, time.time()))
        for sub in self._subscribers:
            sub.shutdown()
        for handles in self._timers.values():
            for h in handles:
                h.cancel()
        await self.cluster.stop()
        for fut in list(self._background):
            fut.cancel()
        with contextlib.suppress(Exception):
            await self._flush_now()
        await asyncio.to_thread(self.store.close)

    # ================================================================== RPC entry points
    async def submit(self, spec: SubmitSpec) -> tuple[Task, bool]:
        """Accept a task (durably) and queue it. Returns (task, deduplicated)."""
        core = self._core()
        if self._shutting_down:
            raise err.ShuttingDown("the server is shutting down")
        dedup = self._check_idempotency(spec.request_id, "SubmitTask", spec.fingerprint)
        if dedup is not None:
            return _public_copy(core.tasks[dedup]), True
        self._validate_task_args(spec)
        if spec.resume_from:
            await self._check_resume_source(spec.resume_from)
        now = time.time()
        timeout = spec.timeout
        if timeout is None:
            timeout = self._policy_timeout(spec)
        task = Task(
            id=uuid.uuid4().hex,
            task=spec.task,
            args=spec.args,
            owner=spec.owner,
            labels=dict(spec.labels),
            priority=spec.priority,
            create_time=now,
            update_time=now,
            timeout=timeout,
            queue_timeout=spec.queue_timeout,
            grace=spec.grace or self.config.grace,
            resume_from=spec.resume_from,
            required_tags=tuple(spec.required_tags),
            seq=next(self._seq),
        )
        self._order.append((task.seq, task.id))
        if spec.request_id:
            rec = IdempotencyRecord(spec.request_id, "SubmitTask", spec.fingerprint, task.id, now)
            self._idempotency[spec.request_id] = rec
            self._batch_for_write().idempotency.append(rec)
        snapshot = _public_copy(task)
        self._handle(msg.TaskSubmitted(task, now))
        await self._flush_soon()
        return snapshot, False

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
        core = self._core()
        dedup = self._check_idempotency(request_id, "InterruptTask", fingerprint)
        if dedup is not None:
            return _public_copy(core.tasks[dedup]), True
        if task_id not in core.tasks:
            raise err.TaskNotFound(
                f"task tasks/{task_id} does not exist", metadata={"name": f"tasks/{task_id}"}
            )
        owner = core.tasks[task_id].owner
        if not admin and owner != principal:
            raise err.PermissionDenied(
                f"{principal} may not interrupt tasks/{task_id}, owned by {owner}",
                metadata={"name": f"tasks/{task_id}", "principal": principal, "owner": owner},
            )
        now = time.time()
        self._handle(
            msg.InterruptRequested(
                task_id,
                requested_by=principal,
                reason=reason,
                cause=InterruptCause.USER,
                now=now,
                grace=grace,
            )
        )
        if request_id:
            rec = IdempotencyRecord(request_id, "InterruptTask", fingerprint, task_id, now)
            self._idempotency[request_id] = rec
            self._batch_for_write().idempotency.append(rec)
        await self._flush_soon()
        return _public_copy(core.tasks[task_id]), False

    def get(self, task_id: str) -> Task:
        task = self._core().tasks.get(task_id)
        if task is None:
            raise err.TaskNotFound(
                f"task tasks/{task_id} does not exist", metadata={"name": f"tasks/{task_id}"}
            )
        return task

    def list_tasks(
        self, flt: TaskFilter, after_seq: int, limit: int
    ) -> tuple[list[Task], int | None]:
        """Tasks with seq > after_seq matching the filter; returns (page, last seq or None at the end)."""
        tasks = self._core().tasks
        start = bisect.bisect_right(self._order, (after_seq, "\uffff"))
        page: list[Task] = []
        for i in range(start, len(self._order)):
            _seq, tid = self._order[i]
            task = tasks.get(tid)
            if task is None or not flt.matches(task):
                continue
            if len(page) == limit:
                return page, page[-1].seq
            page.append(task)
        return page, None

    @property
    def latest_revision(self) -> int:
        return self._core().next_revision - 1

    def subscribe(
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

        Runs without awaiting: the replay is taken from the log and the subscriber
        is registered for live events in the same loop turn, so every event lands
        exactly once, either in ``initial`` or in the live queue.
        """
        if self._shutting_down:
            raise err.ShuttingDown("the server is shutting down")
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
        core = self._core()
        eventlog = self._eventlog()
        if task_id is not None and task_id not in core.tasks:
            raise err.TaskNotFound(
                f"task tasks/{task_id} does not exist", metadata={"name": f"tasks/{task_id}"}
            )
        options = StreamOptions(task_id, flt, exclude_progress, full_view)
        probe = Subscription(options, 0, [])
        initial: list[Any] = []
        if resume_token:
            revision = decode_token(resume_token, epoch=self.epoch)
            initial = [e for e in eventlog.since(revision) if probe.wants(e)]
        elif send_initial_state or task_id is not None:
            snapshot_rev = self.latest_revision
            if task_id is not None:
                initial.append(("snapshot", _public_copy(core.tasks[task_id]), snapshot_rev))
            else:
                initial.extend(
                    ("snapshot", _public_copy(core.tasks[tid]), snapshot_rev)
                    for _, tid in self._order
                    if tid in core.tasks and flt.matches(core.tasks[tid])
                )
                initial.append(("initial_done", None, snapshot_rev))
        sub = Subscription(options, self.config.limits.subscriber_queue, initial, principal)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def engines(self) -> list[Any]:
        return sorted(self._core().engines.values(), key=lambda e: e.id)

    @property
    def pending_count(self) -> int:
        return self._core().queue_length

    @property
    def running_count(self) -> int:
        return self._core().running_count

    # ================================================================== core driving
    def _core(self) -> ControlCore:
        if self.core is None:
            raise err.ShuttingDown("the controller is not started")
        return self.core

    def _eventlog(self) -> EventLog:
        assert self.log is not None
        return self.log

    def _handle(self, event: msg.Event) -> None:
        self._execute(self._core().handle(event))

    def _execute(self, instructions: list[msg.Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, msg.Publish):
                self._publish(ins)
            elif isinstance(ins, msg.Dispatch):
                self._spawn(self._run_task(ins.task_id, ins.attempt, ins.engine_id))
            elif isinstance(ins, msg.SignalEngine):
                self._spawn(self._signal(ins.engine_id, ins.signal))
            elif isinstance(ins, msg.KillEngine):
                self._spawn(self._kill(ins.engine_id, ins.reason))
            elif isinstance(ins, msg.StartEngine):
                self._spawn(self._start_engine(ins.replaces))
            elif isinstance(ins, msg.StartTimer):
                self._start_timer(ins.key, ins.delay)
            elif isinstance(ins, msg.CancelTimers):
                for h in self._timers.pop(ins.task_id, []):
                    h.cancel()
        self._update_serving()

    def _publish(self, p: msg.Publish) -> None:
        # payload: a one-slot cell the stream fills with the serialized message, once.
        entry = LogEntry(p.revision, p.kind, p.task, p.time, p.chunk, [None])
        self._eventlog().append(entry)
        batch = self._batch_for_write()
        batch.events.append(
            StoredEvent(p.revision, p.kind.value, p.task.id, p.time, p.chunk, p.task)
        )
        if p.kind is not msg.EventKind.OUTPUT:
            batch.tasks.append(p.task)
        self._subscribers.deliver(entry)

    def _start_timer(self, key: msg.TimerKey, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, delay), self._fire_timer, key)
        self._timers[key.task_id].append(handle)

    def _fire_timer(self, key: msg.TimerKey) -> None:
        self._handle(msg.TimerFired(key, time.time()))
        self._schedule_flush()

    # ================================================================== store batching
    def _batch_for_write(self) -> WriteBatch:
        if self._batch is None:
            self._batch = WriteBatch(tasks=[], events=[], idempotency=[], checkpoints=[])
            self._schedule_flush()
        return self._batch

    def _schedule_flush(self) -> None:
        if self._batch_future is None:
            loop = asyncio.get_running_loop()
            self._batch_future = loop.create_future()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        batch, fut = self._batch, self._batch_future
        self._batch, self._batch_future = None, None
        if fut is None:
            return
        if batch is None:
            fut.set_result(None)
            return
        try:
            cf = self.store.submit(batch)
        except Exception as exc:  # store closed during shutdown
            fut.set_exception(exc)
            return
        chained = asyncio.wrap_future(cf)
        chained.add_done_callback(lambda f: _transfer(f, fut))

    async def _flush_soon(self) -> None:
        """Wait until everything written so far is committed."""
        if self._batch_future is None:
            return
        await asyncio.shield(self._batch_future)

    async def _flush_now(self) -> None:
        if self._batch is not None or self._batch_future is not None:
            self._schedule_flush()
            await self._flush_soon()

    # ================================================================== cluster side
    def _spawn(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        fut.add_done_callback(_log_failure)

    def _on_engine_registered(self, engine_id: int) -> None:
        if self._shutting_down:
            return
        self._handle(msg.EngineRegistered(engine_id, time.time()))
        self._spawn(self._setup_engine(engine_id))

    def _on_engine_unregistered(self, engine_id: int) -> None:
        if self._shutting_down:
            return
        self._handle(msg.EngineLost(engine_id, time.time()))
        self._schedule_flush()

    def _task_modules(self) -> list[str]:
        """Demo tasks always; LLM tasks when torch is installed (the [llm] extra); then the operator's."""
        import importlib.util

        modules = ["tether_server.tasks.demo"]
        if importlib.util.find_spec("torch") is not None:
            modules.append("tether_server.tasks.llm")
        return [*modules, *self.config.task_modules]

    async def _setup_engine(self, engine_id: int) -> None:
        modules = self._task_modules()
        config = {
            "task_modules": modules,
            "tags": list(self.config.engine_tags),
            "task_settings": registry.settings(),  # e.g. the --model checkpoints
            # LLM engines import torch and the model code at start, not in their first task.
            "preload_modules": ["tether_server.tasks.llm_model:warm_up"]
            if "tether_server.tasks.llm" in modules and self.config.warm_up
            else [],
        }
        try:
            info = await self.cluster.setup_engine(engine_id, config)
        except EngineDied:
            self._handle(msg.EngineLost(engine_id, time.time()))
            return
        except Exception:
            # An engine that cannot run the runtime would sit STARTING forever and shrink
            # the pool. Embedded: kill it; its loss brings a replacement. Attached: the
            # engine may be busy with work of a previous controller (setup queues behind
            # it), and it is not ours to kill; it stays STARTING and the pool degraded.
            if self.cluster.embedded:
                log.exception("engine %s could not be set up; killing it", engine_id)
                await self._kill(engine_id, "setup failed")
            else:
                log.exception("engine %s could not be set up; trying again in 30 s", engine_id)
                self._spawn(self._setup_engine_later(engine_id, 30.0))
            return
        self._handle(
            msg.EngineReady(
                engine_id,
                host=str(info.get("host", "")),
                pid=int(info.get("pid", 0)),
                tags=frozenset(info.get("tags", ())),
                now=time.time(),
            )
        )
        self.ready.set()

    async def _setup_engine_later(self, engine_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        engine = self._core().engines.get(engine_id)
        if engine is not None and engine.state is EngineState.STARTING and not self._shutting_down:
            await self._setup_engine(engine_id)

    async def _run_task(self, task_id: str, attempt: int, engine_id: int) -> None:
        task = self._core().tasks[task_id]
        resume_state = None
        if task.resume_from:
            source = task.resume_from.removeprefix("tasks/")
            text = await self._checkpoint_text(source)
            resume_state = json.loads(text) if text else None
        spec = {
            "task_id": task_id,
            "attempt": attempt,
            "task": task.task,
            "args": task.args,
            "resume_state": resume_state,
            "max_output_chars": self.config.limits.max_output_chars,
            "rss_tolerance_bytes": self.config.rss_tolerance_bytes,
            "gpu_tolerance_bytes": self.config.gpu_tolerance_bytes,
        }
        try:
            raw = await self.cluster.run_task(engine_id, spec)
        except Exception as exc:
            cause = IpyparallelCluster.unwrap_error(exc)
            if isinstance(cause, EngineDied):
                self._handle(msg.EngineLost(engine_id, time.time()))
            else:
                outcome = msg.Outcome(
                    msg.OutcomeStatus.FAILED,
                    error_type=getattr(exc, "ename", type(exc).__name__),
                    error_message=str(getattr(exc, "evalue", exc)),
                    traceback="".join(getattr(exc, "traceback", "") or ""),
                )
                self._handle(msg.TaskFinished(task_id, attempt, outcome, time.time()))
        else:
            # The reply and the IOPub messages travel on different sockets: wait (briefly)
            # for the task's last progress/output messages so none lands after the end.
            await self._messages_seen((task_id, attempt), int(raw.get("published", 0) or 0))
            self._handle(msg.TaskFinished(task_id, attempt, _outcome(raw), time.time()))
        self._received.pop((task_id, attempt), None)
        self._schedule_flush()

    async def _messages_seen(self, key: tuple[str, int], expected: int) -> None:
        if self._received.get(key, 0) >= expected:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._message_waiters[key] = (expected, fut)
        try:
            await asyncio.wait_for(fut, timeout=0.5)
        except TimeoutError:
            log.warning(
                "task %s attempt %s: %d of %d messages arrived before its result",
                key[0],
                key[1],
                self._received.get(key, 0),
                expected,
            )
        finally:
            self._message_waiters.pop(key, None)

    async def _signal(self, engine_id: int, sig: str) -> None:
        try:
            await asyncio.wait_for(self.cluster.signal(engine_id, sig), timeout=5.0)
        except Exception as exc:
            log.info("signal %s to engine %s failed: %s", sig, engine_id, exc)
        self._handle(msg.SignalDelivered(engine_id, time.time()))
        self._schedule_flush()

    async def _kill(self, engine_id: int, reason: str) -> None:
        """SIGKILL an engine, and the processes its task started.

        A SIGKILLed engine cannot clean up after itself, so its descendants (but
        not its nanny, which must report the death to the hub) are listed first
        and killed right after it. This works for engines on this host; remote
        engines' children are left to their host.
        """
        log.info("killing engine %s: %s", engine_id, reason)
        engine = self._core().engines.get(engine_id)
        orphans = _task_descendants(engine.pid) if engine is not None and engine.pid else []
        try:
            await asyncio.wait_for(self.cluster.signal(engine_id, "SIGKILL"), timeout=2.0)
        except Exception:
            # The nanny is gone or slow: kill the process directly when it is local.
            if engine is not None and engine.pid:
                with contextlib.suppress(OSError):
                    os.kill(engine.pid, signal.SIGKILL)
        for proc in orphans:
            with contextlib.suppress(Exception):
                proc.kill()

    async def _start_engine(self, replaces: int | None) -> None:
        if not self.cluster.embedded or self._shutting_down:
            log.warning("engine %s lost; attached mode cannot replace it (pool degraded)", replaces)
            return
        try:
            await self.cluster.start_engines(1)
        except Exception:
            log.exception("could not start a replacement engine")
            self._handle(msg.EngineStartFailed(time.time()))

    def _on_task_message(self, task_id: str, attempt: int, kind: str, payload: Any) -> None:
        if kind != "started":  # the runtime counts reports only (see _messages_seen)
            key = (task_id, attempt)
            count = self._received[key] = self._received.get(key, 0) + 1
            waiter = self._message_waiters.get(key)
            if waiter is not None and count >= waiter[0] and not waiter[1].done():
                waiter[1].set_result(None)
        now = time.time()
        if kind == "started":
            self._handle(msg.TaskStarted(task_id, attempt, now))
        elif kind == "progress":
            fraction, message = payload
            self._handle(msg.TaskProgressed(task_id, attempt, float(fraction), str(message), now))
        elif kind == "output":
            self._handle(msg.TaskOutput(task_id, attempt, str(payload), now))
        elif kind == "checkpoint":
            text = json.dumps(payload)
            self._remember_checkpoint(task_id, text)
            self._batch_for_write().checkpoints.append((task_id, text))
            self._handle(msg.TaskCheckpointed(task_id, attempt, now))
        else:
            return
        self._schedule_flush()

    def _remember_checkpoint(self, task_id: str, text: str) -> None:
        self._checkpoints[task_id] = text
        self._checkpoints.move_to_end(task_id)
        while len(self._checkpoints) > 1000:
            self._checkpoints.popitem(last=False)

    async def _checkpoint_text(self, task_id: str) -> str | None:
        text = self._checkpoints.get(task_id)
        if text is None:
            text = await asyncio.to_thread(self.store.get_checkpoint, task_id)
        return text

    # ================================================================== policies
    def _policy_timeout(self, spec: SubmitSpec) -> float | None:
        if spec.task == "llm.generate":
            p = self.config.llm_timeout
            tokens = float(spec.args.get("max_tokens", 64) or 0)
            prompt = len(str(spec.args.get("prompt", "")))
            return (
                p.base_seconds + p.per_token_seconds * tokens + p.per_prompt_char_seconds * prompt
            )
        return self.config.default_timeout_seconds

    async def _resource_policy_loop(self) -> None:
        import psutil

        limit = self.config.memory_limit_bytes
        while not self._shutting_down:
            await asyncio.sleep(0.25)
            core = self._core()
            for engine in list(core.engines.values()):
                if (
                    engine.state is not EngineState.BUSY
                    or not engine.pid
                    or engine.current_task is None
                ):
                    continue
                try:
                    rss = psutil.Process(engine.pid).memory_info().rss
                except psutil.Error:
                    continue
                if rss > limit:
                    self._handle(
                        msg.ResourceLimitExceeded(
                            engine.id,
                            engine.current_task,
                            engine.current_attempt,
                            f"engine RSS {rss} bytes over the limit of {limit} bytes",
                            time.time(),
                        )
                    )
                    self._schedule_flush()

    # ================================================================== helpers
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

    def _validate_task_args(self, spec: SubmitSpec) -> None:
        """The task name is registered and the arguments fit its signature."""
        try:
            registry.get(spec.task)
        except KeyError:
            raise err.InvalidRequest(
                "UNKNOWN_TASK",
                f"task: no task named {spec.task!r} is registered",
                violations=[
                    err.FieldViolation("task", f"no task named {spec.task!r} is registered")
                ],
                metadata={"field": "task"},
            ) from None
        try:
            registry.validate_args(spec.task, spec.args)
        except registry.ArgumentError as exc:
            raise err.InvalidRequest(
                exc.reason,
                f"args: {exc}",
                violations=[err.FieldViolation(v.field, v.description) for v in exc.violations],
                metadata={"field": "args", **exc.metadata},
            ) from None

    async def _check_resume_source(self, name: str) -> None:
        source_id = name.removeprefix("tasks/")
        source = self._core().tasks.get(source_id)
        if source is None:
            raise err.TaskNotFound(f"task {name} does not exist", metadata={"name": name})
        if not source.has_checkpoint and await self._checkpoint_text(source_id) is None:
            raise err.CheckpointNotFound(
                f"task {name} has no checkpoint to resume from", metadata={"name": name}
            )

    def _update_serving(self) -> None:
        if self._shutting_down or self.core is None:
            return
        serving = any(
            e.state in (EngineState.IDLE, EngineState.BUSY) for e in self.core.engines.values()
        )
        self.on_serving_changed(serving)


def _task_descendants(pid: int) -> list[Any]:
    """Processes started under an engine (its task's children), its nanny excluded."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if "ipyparallel.engine.nanny" in " ".join(child.cmdline()):
                continue
        except psutil.Error:
            continue
        found.append(child)
    return found


def _public_copy(task: Task) -> Task:
    """The task as handed to the API: a snapshot later changes cannot alter."""
    return snapshot(task, keep_output=True)


def _transfer(src: asyncio.Future[Any], dst: asyncio.Future[None]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())  # type: ignore[arg-type]
    else:
        dst.set_result(None)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background task failed", exc_info=fut.exception())


def _outcome(raw: dict[str, Any]) -> msg.Outcome:
    status = msg.OutcomeStatus(raw.get("status", "failed"))
    return msg.Outcome(
        status=status,
        value=raw.get("value"),
        error_type=str(raw.get("error_type", "")),
        error_message=str(raw.get("error_message", "")),
        traceback=str(raw.get("traceback", "")),
        stage=_STAGES.get(str(raw.get("stage", "")), EscalationStage.NONE),
        output=raw.get("output"),
        output_truncated=bool(raw.get("output_truncated", False)),
        resources=raw.get("resources"),
    )


__all__ = ["Controller", "SubmitSpec", "TaskState"]
