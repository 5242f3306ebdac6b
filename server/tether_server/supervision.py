"""Supervision: tether watches the cluster it owns, and repairs it.

The model is a Kubernetes controller's reconcile loop (DESIGN §13, STYLE): the
loop is level-triggered. Every ``TICK`` it observes what actually is (the hub's
process, the hub's answers to a liveness probe, each engine's process and its
nanny) and compares it with what the core believes, then acts. A missed
notification therefore never leaves a wrong state behind for long.

What it repairs:

* **The hub is dead** (its process exited, embedded mode): detected on the next
  tick. **The hub is frozen** (alive, but ``hub_probe_failures`` probes in a row
  unanswered within ``hub_probe_timeout``): detected within
  ``interval * failures + timeout`` seconds. Either way the cluster is lost: the
  core ends what ran with CLUSTER_LOST and forgets the engines (PENDING tasks
  stay queued), health goes NOT_SERVING, every process of the old cluster is
  killed, and a new cluster is started (embedded) or reconnected (attached),
  with backoff, until it works. Then the pending tasks run.
* **An engine is lost** (the hub unregistered it, it was killed, it froze): its
  process and the processes its task started are SIGKILLed on the next tick,
  its nanny a moment later if it did not exit by itself. A lost engine never
  keeps its memory (or its GPU memory) alive.
* **An engine's process died or its nanny died** while the core thinks it alive:
  without a nanny, signals cannot reach the engine and its death would never be
  reported, so the engine is killed and reported lost at once; the core asks
  for a replacement.

Process checks work on this host's engines (pids from the runtime's setup
report); engines on other hosts are left to the hub's heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .cluster import IpyparallelCluster, process_alive
from .config import ServerConfig
from .core import messages as msg
from .core.machine import ControlCore
from .core.model import EngineState

log = logging.getLogger(__name__)

TICK = 0.25
"""Seconds between two observations."""
NANNY_GRACE = 1.0
"""How long a lost engine's nanny may take to exit by itself (it tells the hub first)."""
TRIM_EVERY = 5.0
"""Seconds between two trims of ipyparallel's per-request history in the client."""


@dataclass(slots=True)
class EngineProcesses:
    """The processes of one engine on this host."""

    engine: Any
    """psutil.Process of the engine (a pid reused later is told apart by psutil)."""
    nanny: Any | None
    lost_since: float | None = None
    children: list[Any] = field(default_factory=list)


class Supervisor:
    """The reconcile loop over the hub, the engines and their processes."""

    def __init__(
        self,
        cluster: IpyparallelCluster,
        config: ServerConfig,
        *,
        core: Callable[[], ControlCore],
        handle: Callable[[msg.Event], None],
        cluster_state: Callable[[bool], None],
        cluster_lost: Callable[[], None],
        cluster_started: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self._core = core
        self._handle = handle
        self._cluster_state = cluster_state
        self._cluster_lost = cluster_lost
        self._cluster_started = cluster_started
        self._processes: dict[int, EngineProcesses] = {}
        self._probe_failures = 0
        self._next_probe = 0.0
        self._next_trim = 0.0
        self._probing: asyncio.Task[bool] | None = None
        self._stopped = False
        self.recovering = False
        self.cluster_ok = False
        self.losses = 0
        """How many times the cluster was lost and brought back (for GetCluster and tests)."""
        self._hostname = socket.gethostname()

    # ------------------------------------------------------------------ engines
    def track(self, engine_id: int, host: str, pid: int, *, local: bool | None = None) -> None:
        """Watch the processes of an engine that just became ready (local ones only).

        ``local``: whether the engine's pid is one of this host's processes (the cluster
        adapter tells from the engine's setup report); None: judged by the host name.
        """
        if local is None:
            local = not host or host == self._hostname
        if not pid or not local:
            return
        import psutil

        try:
            proc = psutil.Process(pid)
            nannies = [c for c in proc.children() if "nanny" in " ".join(c.cmdline())]
        except psutil.Error:
            return
        self._processes[engine_id] = EngineProcesses(proc, nannies[0] if nannies else None)

    def task_children(self, engine_id: int) -> list[Any]:
        """Processes the engine's task started (its nanny excluded), for the SIGKILL stage."""
        procs = self._processes.get(engine_id)
        if procs is None:
            return []
        import psutil

        try:
            children = procs.engine.children(recursive=True)
        except psutil.Error:
            return []
        nanny_pid = procs.nanny.pid if procs.nanny is not None else -1
        return [c for c in children if c.pid != nanny_pid]

    def local_pid(self, engine_id: int) -> int | None:
        procs = self._processes.get(engine_id)
        return None if procs is None else int(procs.engine.pid)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Observe and repair until :meth:`stop`; never raises."""
        while not self._stopped:
            await asyncio.sleep(TICK)
            if self._stopped:
                return
            try:
                await self._reconcile(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervision step failed; trying again")

    def stop(self) -> None:
        self._stopped = True
        if self._probing is not None:
            self._probing.cancel()

    async def _reconcile(self, now: float) -> None:
        if self.recovering or not self.cluster_ok or self._stopped:
            return
        if not self.cluster.controller_alive():
            await self.recover("the ipyparallel controller process exited")
            return
        if await self._hub_frozen(now):
            failures = self.config.hub_probe_failures
            await self.recover(f"the ipyparallel controller did not answer {failures} probes")
            return
        self._reap(now)
        if now >= self._next_trim:
            self._next_trim = now + TRIM_EVERY
            self.cluster.trim_history()

    async def _hub_frozen(self, now: float) -> bool:
        probing = self._probing
        if probing is not None and probing.done():
            self._probing = None
            answered = not probing.cancelled() and probing.exception() is None and probing.result()
            self._probe_failures = 0 if answered else self._probe_failures + 1
            if self._probe_failures >= self.config.hub_probe_failures:
                return True
        if self._probing is None and now >= self._next_probe:
            self._next_probe = now + self.config.hub_probe_interval
            self._probing = asyncio.ensure_future(self.cluster.probe(self.config.hub_probe_timeout))
        return False

    def _reap(self, now: float) -> None:

        engines = self._core().engines
        for engine_id, procs in list(self._processes.items()):
            engine = engines.get(engine_id)
            lost = engine is None or engine.state is EngineState.LOST
            alive = process_alive(procs.engine)
            if not lost:
                nanny_gone = procs.nanny is not None and not process_alive(procs.nanny)
                if not alive or nanny_gone:
                    why = "its process exited" if not alive else "its nanny died"
                    log.warning("engine %s is lost: %s", engine_id, why)
                    procs.children = self.task_children(engine_id)
                    _kill(procs.engine)
                    self._handle(msg.EngineLost(engine_id, time.time()))
                    lost = True
            if not lost:
                continue
            if procs.lost_since is None:
                procs.lost_since = now
                if alive:
                    procs.children = self.task_children(engine_id)
                    _kill(procs.engine)
                for child in procs.children:
                    _kill(child)
            nanny_alive = procs.nanny is not None and process_alive(procs.nanny)
            if nanny_alive and now - procs.lost_since >= NANNY_GRACE:
                _kill(procs.nanny)
            if (
                not process_alive(procs.engine)
                and not nanny_alive
                and not any(process_alive(c) for c in procs.children)
            ):
                del self._processes[engine_id]

    # ------------------------------------------------------------------ recovery
    async def recover(self, detail: str) -> None:
        """The cluster is lost: say so, end what ran on it, and bring a new one up."""
        if self.recovering:
            return
        self.recovering = True
        self.cluster_ok = False
        self.losses += 1
        log.error("cluster lost: %s; restarting it", detail)
        try:
            self._cluster_state(False)
            self._handle(msg.ClusterLost(detail, time.time()))
            self._cluster_lost()
            if self._probing is not None:
                self._probing.cancel()
                self._probing = None
            self._probe_failures = 0
            leftovers = list(self._processes.values())
            self._processes.clear()
            await self.cluster.teardown()
            for procs in leftovers:  # remote-free, so ours: be sure none survived
                for proc in (procs.engine, procs.nanny, *procs.children):
                    if proc is not None:
                        _kill(proc)
            await self.start_cluster()
        finally:
            self.recovering = False

    def mark_cluster_up(self) -> None:
        """The cluster answers: say so (serving is re-evaluated at once, not at the next
        event: a re-attached server may have nothing else to hear for a long while)."""
        self.cluster_ok = True
        self._next_probe = time.monotonic() + self.config.hub_probe_interval
        self._cluster_state(True)

    async def start_cluster(self) -> None:
        """Start (or reconnect to) the cluster, retrying with backoff until it works."""
        delay = 0.5
        while not self._stopped:
            try:
                await self.cluster.start()
            except Exception as exc:
                log.error("could not start the cluster (%s); retrying in %.1f s", exc, delay)
                with contextlib.suppress(Exception):
                    await self.cluster.teardown()
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)
                continue
            self.mark_cluster_up()
            if self._cluster_started is not None:
                await self._cluster_started()
            return


def _kill(proc: Any) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        if proc.is_running():
            proc.kill()
