"""Prometheus metrics of one tether-server (served at ``/metrics`` by ``web.server``).

Two sources, so that no metric needs a hook deep in the controller:

* **Events.** Every task change is a published event carrying the full task snapshot
  (``Controller.listeners``). ``TaskMetrics.observe`` derives the counters and
  histograms from them: submissions, finishes by final state and reason, interrupt
  latency by the stage that ended the task, dispatch latency, run time, recycles.
* **State read at scrape time.** ``StateCollector`` asks the controller's public
  accessors (tasks by state, queue depth, engines by state and host, open streams)
  when Prometheus scrapes, so a gauge can never drift from the truth.

Labels have bounded cardinality: the registered task name (``task``) is a label, a task
id never is. Per-engine load carries the engine id, but only for engines in the pool
now (a handful), never for history. Names follow Prometheus conventions: ``tether_``
prefix, base units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.eventlog import LogEntry
from ..core.messages import EventKind
from ..core.model import EngineState, TaskState

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: interrupts end in ~25 ms (SIGINT) to a few seconds (SIGKILL after two graces)."""
RUN_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class TaskMetrics:
    """Counters and histograms fed by the controller's published events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.submitted = Counter(
            "tether_tasks_submitted", "Tasks accepted by SubmitTask.", ["task"], registry=r
        )
        self.finished = Counter(
            "tether_tasks_finished",
            "Tasks that reached a terminal state, by final state and error reason (NONE: succeeded).",
            ["task", "state", "reason"],
            registry=r,
        )
        self.interrupts = Counter(
            "tether_interrupts_requested",
            "Interrupts asked for (by a user, a timeout, a resource limit or shutdown).",
            ["task", "cause"],
            registry=r,
        )
        self.interrupt_latency = Histogram(
            "tether_interrupt_latency_seconds",
            "From the interrupt request to the task's terminal state, by the stage that ended it.",
            ["final_stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.memory_back = Histogram(
            "tether_interrupt_memory_reclaimed_seconds",
            "From the interrupt request until the engine's memory (RSS and GPU) was back: the "
            "terminal event when the runtime measured it reclaimed, the recycle otherwise.",
            ["final_stage", "recycled"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "tether_task_dispatch_latency_seconds",
            "From submission (or re-queue) to RUNNING on an engine.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "tether_task_run_duration_seconds",
            "From RUNNING to the terminal state, by final state.",
            ["task", "state"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self.recycles = Counter(
            "tether_engine_recycles",
            "Engines killed after a task because its memory or child processes did not come back.",
            ["task"],
            registry=r,
        )
        self.requeued = Counter(
            "tether_task_attempts_requeued",
            "Attempts that ended with the task queued again: RETRIED (a failure its retry "
            "policy retries) or PREEMPTED, by the attempt's reason.",
            ["task", "ending", "reason"],
            registry=r,
        )
        self.output = Counter(
            "tether_task_output_chunks",
            "Output chunks (e.g. tokens) published by tasks.",
            ["task"],
            registry=r,
        )
        # Last known state of each live task: bounded by the live tasks, forgotten at the end.
        self._live: dict[str, TaskState] = {}
        self._interrupt_seen: set[str] = set()
        self._pending_since: dict[str, float] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.engine_gpu_bytes: dict[int, int] = {}
        """GPU memory each engine held after its last task that measured it (runtime report)."""

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the fan-out path runs it for every event."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, entry: LogEntry) -> None:
        """One published event. Never raises: metrics must not break the controller."""
        try:
            self._observe(entry)
        except Exception:  # pragma: no cover - a bug here is logged, not propagated
            log.exception("metrics: could not observe event %s", entry.revision)

    def _observe(self, entry: LogEntry) -> None:
        task = entry.task
        name = task.task
        if entry.kind is EventKind.OUTPUT:
            self._child(self.output, name).inc()
            return
        if task.interrupt is not None and task.id not in self._interrupt_seen:
            self._interrupt_seen.add(task.id)
            self._child(self.interrupts, name, task.interrupt.cause.name).inc()
        if entry.kind is not EventKind.STATE_CHANGED:
            return
        previous = self._live.get(task.id)
        state = task.state
        if state is TaskState.PENDING:
            if previous is None and task.attempt == 0:
                self._child(self.submitted, name).inc()
            elif previous is not None and task.attempts:  # queued again: a new attempt follows
                ended = task.attempts[-1]
                self._child(self.requeued, name, ended.ending.name, ended.reason).inc()
                self._interrupt_seen.discard(task.id)  # the next attempt's interrupt counts too
            self._pending_since[task.id] = entry.time
        elif task.id in self._pending_since and state is TaskState.RUNNING:
            # The RUNNING event is published when the core dispatches the attempt.
            queued = self._pending_since.pop(task.id)
            self._child(self.dispatch_latency, name).observe(max(0.0, entry.time - queued))
        if state.terminal:
            self._live.pop(task.id, None)
            self._pending_since.pop(task.id, None)
            self._interrupt_seen.discard(task.id)
            self._finished(entry)
        else:
            self._live[task.id] = state

    def _finished(self, entry: LogEntry) -> None:
        task = entry.task
        end = task.end_time or entry.time
        reason = task.error.reason.value if task.error is not None else "NONE"
        self._child(self.finished, task.task, task.state.name, reason).inc()
        if task.start_time is not None:
            self._child(self.run_time, task.task, task.state.name).observe(
                max(0.0, end - task.start_time)
            )
        record = task.interrupt
        recycled = task.resources is not None and task.resources.engine_recycled
        if recycled:
            self._child(self.recycles, task.task).inc()
        res = task.resources
        measured = res is not None and (
            res.gpu_allocated_before_bytes or res.gpu_allocated_after_bytes
        )
        if res is not None and measured and task.engine_id is not None:
            self.engine_gpu_bytes[task.engine_id] = res.gpu_allocated_after_bytes
        if record is None:
            return
        stage = record.final_stage.name
        latency = max(0.0, end - record.request_time)
        self._child(self.interrupt_latency, stage).observe(latency)
        if task.resources is not None and (task.resources.reclaimed or recycled):
            self._child(self.memory_back, stage, str(recycled).lower()).observe(latency)


class StoreMetrics:
    """Commit latency and failures, called from the store's writer thread (thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commit_latency = Histogram(
            "tether_store_commit_duration_seconds",
            "Duration of one SQLite write transaction (group commit).",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_failures = Counter(
            "tether_store_commit_failures",
            "SQLite write transactions that failed and were rolled back.",
            registry=registry,
        )

    def on_commit(self, seconds: float, ok: bool) -> None:
        if ok:
            self.commit_latency.observe(seconds)
        else:
            self.commit_failures.inc()


class StateCollector(Collector):
    """Gauges read from the controller when Prometheus scrapes.

    ``source`` returns the controller, or None while it is not started (then nothing
    is reported); ``streams`` returns (open streams, lagging cut-offs so far).
    """

    def __init__(
        self,
        source: Callable[[], Any],
        streams: Callable[[], tuple[int, int]],
        tasks: TaskMetrics,
    ) -> None:
        self._source = source
        self._tasks = tasks
        self._streams = streams
        self._host = socket.gethostname()
        self._processes: collections.OrderedDict[int, psutil.Process] = collections.OrderedDict()
        # One small tuple per engine ever seen: a few per replacement, never per task.
        self._generation = 0
        self._last_size = 0
        self._joined: set[tuple[int, int]] = set()
        self._lost: set[tuple[int, int]] = set()

    def collect(self) -> Iterator[Any]:
        ctl = self._source()
        if ctl is None or ctl.core is None:
            return
        core = ctl.core
        by_state = GaugeMetricFamily(
            "tether_tasks",
            "Unfinished tasks by state (PENDING, RUNNING, INTERRUPTING) and task name; finished "
            "ones are counted by tether_tasks_finished_total.",
            labels=["state", "task"],
        )
        # The core's table holds live work (finished tasks leave it once stored).
        counts: collections.Counter[tuple[str, str]] = collections.Counter(
            (t.state.name, t.task) for t in core.tasks.values() if not t.state.terminal
        )
        for (state, name), n in sorted(counts.items()):
            by_state.add_metric([state, name], n)
        yield by_state
        yield _gauge("tether_queue_depth", "Tasks waiting for an engine.", ctl.pending_count)
        yield _gauge("tether_tasks_running", "Tasks on an engine.", ctl.running_count)
        yield from self._engines(ctl)
        open_streams, cutoffs = self._streams()
        yield _gauge(
            "tether_streams_open", "Open StreamTaskStatus calls (gRPC and HTTP).", open_streams
        )
        yield CounterMetricFamily(
            "tether_stream_lagging_cutoffs",
            "Streams ended with UNAVAILABLE / SUBSCRIBER_LAGGING because they fell behind.",
            cutoffs,
        )
        driver = getattr(ctl, "engines_driver", None)
        if driver is not None:
            yield CounterMetricFamily(
                "tether_task_requests",
                "Requests sent to engines to run tasks: one task each, or several short ones "
                "under load (--pipeline-depth).",
                driver.requests_sent,
            )
            yield CounterMetricFamily(
                "tether_task_request_attempts",
                "Task attempts those requests carried.",
                driver.attempts_sent,
            )
        yield _gauge(
            "tether_event_log_revision",
            "Revision of the newest published event.",
            ctl.latest_revision,
        )

    def _engines(self, ctl: Any) -> Iterator[Any]:
        engines = ctl.engines()
        by_state = GaugeMetricFamily(
            "tether_engines", "Engines by state and host.", labels=["state", "host"]
        )
        counts: collections.Counter[tuple[str, str]] = collections.Counter(
            (e.state.name, e.host or "unknown") for e in engines
        )
        # Every state of every host, zeros included: an alert on IDLE == 0 needs the zero.
        for host in sorted({h for _, h in counts}):
            for state in EngineState:
                by_state.add_metric([state.name, host], counts[(state.name, host)])
        yield by_state
        lost, joined = self._engine_history(engines)
        yield CounterMetricFamily("tether_engines_lost", "Engines that died or were killed.", lost)
        first_pool = ctl.target_engines + getattr(ctl.config, "spare_engines", 0)
        replaced = max(0, joined - first_pool) if ctl.cluster.embedded else 0
        yield CounterMetricFamily(
            "tether_engine_replacements",
            "Engines started beyond the first pool: replacements of lost ones, and the pool "
            "of a restarted cluster.",
            replaced,
        )
        yield _gauge(
            "tether_engines_target",
            "The pool's configured size (spares not counted).",
            ctl.target_engines,
        )
        rss = GaugeMetricFamily(
            "tether_engine_rss_bytes",
            "Resident memory of each live engine (psutil on this host; the engine's own "
            "report on other hosts).",
            labels=["engine", "host"],
        )
        cpu = CounterMetricFamily(
            "tether_engine_cpu_seconds",
            "CPU time used by each live engine on this host (psutil).",
            labels=["engine", "host"],
        )
        gpu = GaugeMetricFamily(
            "tether_engine_gpu_allocated_bytes",
            "GPU memory allocated on each live engine after its last task (runtime report).",
            labels=["engine", "host"],
        )
        queued = GaugeMetricFamily(
            "tether_engine_queued_tasks",
            "Tasks sent to each live engine that wait behind its running one (--pipeline-depth).",
            labels=["engine", "host"],
        )
        last_gpu = self._tasks.engine_gpu_bytes
        live = [e for e in engines if e.state is not EngineState.LOST]
        for e in live:
            labels = [str(e.id), e.host or "unknown"]
            queued.add_metric(labels, e.queued_count)
            # This host's engines only (never a remote engine's pid, host names or not).
            proc = self._process(ctl.supervisor.local_pid(e.id) or 0, "")
            load = ctl.loads.latest(e.id)
            if proc is None and load is not None:  # remote: the engine's own report
                rss.add_metric(labels, load.rss_bytes)
            if proc is not None:
                try:
                    with proc.oneshot():
                        rss.add_metric(labels, proc.memory_info().rss)
                        times = proc.cpu_times()
                        cpu.add_metric(labels, times.user + times.system)
                except psutil.Error:
                    self._processes.pop(e.pid, None)
            if e.id in last_gpu:
                gpu.add_metric(labels, last_gpu[e.id])
        self._forget_dead(live)
        for engine_id in [i for i in last_gpu if i not in {e.id for e in live}]:
            last_gpu.pop(engine_id, None)
        yield queued
        yield rss
        yield cpu
        yield gpu

    def _engine_history(self, engines: list[Any]) -> tuple[int, int]:
        """(engines lost, engines joined) since start, counted from what each scrape sees.

        Lost engines stay in the pool's table until the whole cluster is lost, when the
        table is cleared and the new hub numbers its engines from 0 again: a table that
        shrank starts a new generation, so a reused id is a new engine.
        """
        if len(engines) < self._last_size:
            self._generation += 1
        self._last_size = len(engines)
        for e in engines:
            key = (self._generation, e.id)
            self._joined.add(key)
            if e.state is EngineState.LOST:
                self._lost.add(key)
        return len(self._lost), len(self._joined)

    def _process(self, pid: int, host: str) -> psutil.Process | None:
        if not pid or (host and host != self._host and host != "localhost"):
            return None  # another host: its load is not ours to read
        proc = self._processes.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self._processes[pid] = proc
        return proc

    def _forget_dead(self, live: list[Any]) -> None:
        pids = {e.pid for e in live}
        for pid in [p for p in self._processes if p not in pids]:
            del self._processes[pid]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
