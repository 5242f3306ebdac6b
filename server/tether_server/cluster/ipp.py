"""ipyparallel adapter, run entirely on the service's asyncio loop.

Facts it rests on (shared/notes/ipyparallel.md): the ``Client`` is not
thread-safe, so every call happens on the loop thread; the client is a
:class:`~.loop_client.LoopClient`, whose sockets the loop itself serves (no IO thread:
replies and registration callbacks arrive on the loop thread) and whose
``request_apply`` answers tether's requests as asyncio futures; the client keeps only
the *last* ``publish_data`` value, so the runtime's reports are read from our own SUB
socket on the IOPub channel (``iopub.py``), which sees every message; the ``*_sync``
Cluster methods lose launcher notifications, so only the async ones are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipyparallel as ipp
from ipyparallel import error as ipp_error
from tornado.ioloop import IOLoop
from traitlets.config import Config

from ..runtime import batch as engine_batch
from ..runtime import engine as engine_runtime
from ..runtime.engine import detected_tags
from ..runtime.placement import process_namespace
from . import hub_records
from .hosts import EngineHost, SshSettings
from .hub_records import HubRecord
from .iopub import ReportWatcher, quiet_client_iopub
from .loop_client import LoopClient
from .processes import (
    cluster_pids,
    kill_and_wait,
    kill_tree,
    pids_in_cluster_file,
    remove_connection_files,
)
from .ssh import RemoteEngines

log = logging.getLogger(__name__)

CLUSTER_ID = "tether"


class EngineDied(Exception):
    """The engine running an apply died (ipyparallel's EngineError)."""


@dataclass(slots=True)
class ClusterConfig:
    """How to get a cluster."""

    engines: int = 2
    profile_dir: Path = Path(".tether-data/ipython")
    heartbeat_ms: int = 500
    attach_cluster_file: str = ""
    """Attached mode: path of an ipyparallel cluster file or client connection file."""
    engine_setup_timeout: float = 60.0
    engine_hosts: tuple[EngineHost, ...] = ()
    """Other hosts whose engines the SSH launcher places (embedded mode)."""
    ssh: SshSettings = field(default_factory=SshSettings)
    cluster_ip: str = ""
    """Where the hub listens and engines dial ("": 127.0.0.1, this host only)."""


@dataclass(slots=True)
class ClusterCallbacks:
    """What the controller wants to hear about. All are called on the loop thread."""

    engine_registered: Callable[[int], None]
    engine_unregistered: Callable[[int], None]
    task_message: Callable[[str, int, str, Any], None]
    """(task_id, attempt, kind, payload) from ``publish_data({"tether": [...]})``."""


@dataclass(slots=True)
class _State:
    known_ids: set[int] = field(default_factory=set)


DIGEST_HISTORY = 4096
"""Message signatures each ZMQ session remembers to refuse replays (jupyter_client keeps
65,536 by default: about 10 MB per process that fills up over the first ~20,000 tasks, and
on engines over the first ~100,000; a few thousand refuse replays just as well)."""

ENGINE_LOG_LEVEL = logging.ERROR
"""What tether's own engines log (ipyparallel 9.2 leaves their handler at INFO whatever
``--IPEngine.log_level`` says, one line per task: ``setup_engine`` applies it)."""
ENGINE_ARGS = [
    f"--IPEngine.log_level={ENGINE_LOG_LEVEL}",
    f"--Session.digest_history_size={DIGEST_HISTORY}",
]

HUB_CHILDREN_EVERY = 5.0
"""Seconds between two listings of the hub's child processes (``controller_alive``)."""

HUB_MODULE = "tether_server.cluster.ipyparallel_hub"
"""The controller entry point tether runs (ipyparallel's, with bounded bookkeeping)."""


class IpyparallelCluster:
    """Owns (or attaches to) an ipyparallel cluster on the current asyncio loop.

    A cluster can be lost (its hub killed or frozen) and started again: each
    start is a new *generation*, and nothing of an older one (a registration
    notification, an engine id) is reported after it was torn down.
    """

    def __init__(self, config: ClusterConfig, callbacks: ClusterCallbacks) -> None:
        self.config = config
        self.callbacks = callbacks
        self.embedded = not config.attach_cluster_file
        self._cluster: Any = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: ReportWatcher | None = None
        self._state = _State()
        self._closing = False
        self.generation = 0
        """Incremented by every start; notifications of older generations are dropped."""
        self._hub_children: set[Any] = set()
        self._hub_children_listed_at = 0.0
        self._hub_started_at = 0.0
        self.remote = RemoteEngines(config.engine_hosts, config.ssh)
        """Engines on other hosts: their slots and launchers (empty: this host only)."""
        self.engine_slots: dict[int, str] = {}
        """Engine id -> remote slot key, from each engine's setup report."""
        self._process_namespace = process_namespace()

    # ------------------------------------------------------------------ lifecycle
    @property
    def cluster_id(self) -> str:
        return CLUSTER_ID if self._cluster is None else str(self._cluster.cluster_id)

    async def start(self) -> None:
        """Start (embedded) or attach to the cluster, then connect the client.

        Called again after :meth:`teardown` to bring a lost cluster back.
        """
        self._loop = asyncio.get_running_loop()
        self._hub_started_at = time.monotonic()
        self.generation += 1
        self._state = _State()
        if self.embedded:
            self._cleanup_stale_cluster()
            self.config.profile_dir.mkdir(parents=True, exist_ok=True)
            # Engines inherit this process's environment: share the cores between them
            # rather than let every engine's BLAS/torch use all of them.
            threads = max(1, (os.cpu_count() or 1) // max(1, self.config.engines))
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
            config = Config()
            config.LocalControllerLauncher.controller_cmd = [sys.executable, "-m", HUB_MODULE]
            self._cluster = ipp.Cluster(
                config=config,
                n=self.config.engines,
                profile_dir=str(self.config.profile_dir),
                cluster_id=CLUSTER_ID,
                controller_ip=self.config.cluster_ip or "127.0.0.1",
                controller_args=[
                    f"--HeartMonitor.period={self.config.heartbeat_ms}",
                    "--IPController.log_level=40",
                    # tether keeps its own records: the hub keeps none per task.
                    "--IPController.db_class=NoDB",
                    f"--Session.digest_history_size={DIGEST_HISTORY}",
                ],
                engine_args=ENGINE_ARGS,
                delay=0,
                shutdown_atexit=True,
                # Every clean engine stop exits 1 in ipyparallel 9.2, which its launcher
                # reports as a warning with the whole engine log: keep shutdown quiet.
                log_level=logging.ERROR,
            )
            await self._cluster.start_controller()
            if self.config.engines:
                await self._cluster.start_engines(self.config.engines)
            await self._start_remote_engines()
            self._client = await self._connect(self._cluster)
        else:
            path = self.config.attach_cluster_file
            with open(path) as f:
                info = json.load(f)
            if "cluster" in info:  # a cluster file written by ipyparallel.Cluster
                self._cluster = ipp.Cluster.from_file(path)
                self._client = await self._connect(self._cluster)
            else:  # a client connection file
                self._client = await asyncio.to_thread(LoopClient, path, timeout=5)
        self._client.attach()
        generation = self.generation

        def on_registration(event: dict[str, Any]) -> None:
            self._on_registration(event, generation)

        self._client.session.digest_history_size = DIGEST_HISTORY
        self._client._registration_callbacks.append(on_registration)
        quiet_client_iopub(self._client)
        self._reports = ReportWatcher(
            self._client._config, DIGEST_HISTORY, self.callbacks.task_message
        )
        self._reports.start()
        self.controller_alive()  # notes the hub's scheduler processes
        # Engines that registered before our callback was installed.
        for eid in self._client.ids:
            self._note_registered(int(eid))

    @staticmethod
    async def _connect(cluster: Any) -> Any:
        """A client of ``cluster``, made off the loop (``attach`` it on the loop).

        The Client blocks until the hub answers its connection request: a dead or
        frozen hub must neither block the loop nor hang a reconnect for long.
        """
        connection = cluster.controller.get_connection_info()
        if inspect.isawaitable(connection):
            connection = await asyncio.wait_for(connection, timeout=30)
        return await asyncio.to_thread(
            LoopClient,
            connection["client"],
            cluster=cluster,
            profile_dir=cluster.profile_dir,
            cluster_id=cluster.cluster_id,
            timeout=10,
        )

    async def stop(self) -> None:
        """Close the client and (embedded) stop every cluster process.

        Returns only when every process of the cluster is gone (a supervisor that
        starts tether again at once must not race the old engines).
        """
        self._closing = True
        await self._disconnect()
        await self.remote.stop_all()
        if self.embedded and self._cluster is not None:
            pids = self._cluster_pids()
            try:
                await asyncio.wait_for(self._cluster.stop_cluster(), timeout=3.5)
            except Exception:
                log.warning("stop_cluster did not finish cleanly; killing what is left")
            await asyncio.to_thread(kill_and_wait, pids + self._cluster_pids(), 2.0)
            with contextlib.suppress(Exception):
                self._cluster.remove_cluster_file()

    async def teardown(self) -> None:
        """Forget a lost cluster: disconnect, and (embedded) kill every process of it.

        The hub is dead or frozen, so nothing is asked of it; engines and their
        nannies are killed by pid, and the process table is checked until they are
        gone. :meth:`start` may then start a new generation.
        """
        self.generation += 1  # from now on, nothing of the old cluster is reported
        await self._disconnect()
        await self.remote.stop_all()  # they would wait for the old hub forever
        self.engine_slots.clear()
        if self.embedded and self._cluster is not None:
            pids = self._cluster_pids()
            await asyncio.to_thread(kill_and_wait, pids, 3.0)
            self._remove_connection_files()
            self._cluster = None
            self._hub_children.clear()

    async def _disconnect(self) -> None:
        if self._reports is not None:
            await self._reports.stop()
            self._reports = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(linger=0)
            self._client = None

    # ------------------------------------------------------------------ supervision
    def controller_alive(self) -> bool:
        """Embedded: whether the hub's process still exists. Attached: unknown (True)."""
        if not self.embedded or self._cluster is None:
            return True
        pid = self._controller_pid()
        if not pid:
            return False
        import psutil

        try:
            hub = psutil.Process(pid)
            if hub.status() == psutil.STATUS_ZOMBIE:
                return False
            # The hub forks its schedulers; they outlive a killed hub, so keep them in
            # mind while it lives, for teardown to kill. Listing them walks the whole
            # process table, and they are forked at its start: at every call while it is
            # young, every few seconds after.
            now = time.monotonic()
            young = now < self._hub_started_at + 2 * HUB_CHILDREN_EVERY
            if young or now >= self._hub_children_listed_at + HUB_CHILDREN_EVERY:
                self._hub_children_listed_at = now
                self._hub_children.update(hub.children(recursive=True))
        except psutil.Error:
            return False
        return True

    def _controller_pid(self) -> int | None:
        launcher = getattr(self._cluster, "controller", None)
        pid = getattr(getattr(launcher, "process", None), "pid", None)
        return int(pid) if pid else None

    async def probe(self, timeout: float) -> bool:
        """Ask the hub for its queue status; False when it does not answer in time.

        A hub that is alive but frozen (SIGSTOP, a hung host) keeps its sockets open,
        so only a request that needs an answer tells it apart from a healthy one.
        """
        client = self._client
        if client is None:
            return False
        try:
            content = {"targets": None, "verbose": False}
            reply = await hub_records.query(client, "queue_request", content, timeout)
        except Exception:
            return False
        return bool(reply.get("content", {}).get("status") == "ok")

    def trim_history(self) -> None:
        """Drop the client's per-request history (ipyparallel keeps every id).

        Outstanding requests are tracked elsewhere (``outstanding``), so forgetting
        ``history`` loses nothing tether uses.
        """
        if self._client is not None:
            self._client.history.clear()

    # ------------------------------------------------------------------ engines
    async def setup_engine(self, engine_id: int, config: dict[str, Any]) -> dict[str, Any]:
        """Install the tether runtime on one engine; returns its description.

        A just-registered engine may not be connected to the mux yet (ipyparallel
        issue 476): an early apply can be dropped, so it is sent again every 5 s until
        the deadline. An engine whose queue holds other work (attached mode: a task of
        a previous controller runs there) answers only after that work: it is waited
        for, without sending again and without a deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.engine_setup_timeout
        sent: list[asyncio.Future[Any]] = []
        while loop.time() < deadline:
            if not sent or await self._queued_requests(engine_id) <= len(sent):
                sent.append(self._send_apply(engine_id, engine_runtime.setup_engine, config, ""))
            else:
                deadline = loop.time() + self.config.engine_setup_timeout
            done, _pending = await asyncio.wait(
                sent, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
            )
            for fut in done:
                try:
                    return dict(raise_error(fut.result()))
                except ipp_error.RemoteError as exc:
                    if exc.ename == "EngineError":
                        raise EngineDied(str(exc)) from exc
                    raise
        raise TimeoutError(
            f"engine {engine_id} did not finish setup in {self.config.engine_setup_timeout} s"
        )

    async def _queued_requests(self, engine_id: int) -> int:
        """Requests waiting in or running on the engine, as the hub counts them (0: unknown)."""
        client = self._client
        if client is None:
            return 0
        try:
            content = {"targets": [engine_id], "verbose": False}
            reply = await hub_records.query(client, "queue_request", content, 5.0)
            return int(reply["content"][str(engine_id)]["queue"])
        except Exception:
            return 0

    async def run_task(self, engine_id: int, spec: dict[str, Any], label: str = "") -> Any:
        """Send one task to one engine; returns the runtime's outcome dict (``send_task``)."""
        return raise_error(await self.send_task(engine_id, spec, label))

    def send_task(
        self, engine_id: int, spec: dict[str, Any], label: str = ""
    ) -> asyncio.Future[Any]:
        """Send one task to one engine now; the future of the runtime's outcome dict, or
        of the error as an exception object (``raise_error`` raises it).

        ``label`` goes into the hub's record of the request (``hub_records``): a
        restarted controller finds it there.

        Sent with ``LoopClient.request_apply``, not ``DirectView.apply_async`` or even
        ``send_apply_request``: their per-request futures and bookkeeping cost more than
        the rest of the send (docs/benchmarks.md, B4). The request is still outstanding
        on its engine, so an engine's death fails it with ``EngineError``. The error is
        what the engine raised (``RemoteError``), ``EngineError`` included, or
        ``EngineDied`` for a request that could not be sent.
        """
        return self._send_or_fail(engine_id, engine_runtime.run_task, spec, label)

    def send_tasks(
        self, engine_id: int, specs: list[dict[str, Any]], label: str = ""
    ) -> asyncio.Future[Any]:
        """Send several tasks to one engine in one request (``runtime.batch.run_tasks``);
        the future of their outcomes (a list, in order), or of the error, as ``send_task``."""
        return self._send_or_fail(engine_id, engine_batch.run_tasks, specs, label)

    def _send_or_fail(
        self, engine_id: int, function: Any, arg: Any, label: str
    ) -> asyncio.Future[Any]:
        """``_send_apply``, with a request that could not be sent as the future's error."""
        try:
            return self._send_apply(engine_id, function, arg, label)
        except Exception as exc:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(exc)
            return fut

    def _send_apply(
        self, engine_id: int, function: Any, arg: Any, label: str
    ) -> asyncio.Future[Any]:
        """Send ``function(arg)`` to one engine; the future of its reply (value or error,
        ``LoopClient.request_apply``)."""
        client = self._client
        if client is None:
            raise EngineDied(f"engine {engine_id}: the cluster is not connected")
        uuid = client._engines.get(engine_id)
        if uuid is None:  # unregistered meanwhile
            raise EngineDied(f"engine {engine_id} is gone")
        future: asyncio.Future[Any] = client.request_apply(uuid, function, arg, label)
        return future

    async def hub_records(self, query: dict[str, Any]) -> list[tuple[HubRecord, int | None]]:
        """The hub's records matching ``query``, each with its engine's id (None: gone)."""
        client = self._client
        if client is None:
            raise EngineDied("the cluster is not connected")
        ids = {uuid: eid for eid, uuid in client._engines.items()}
        records = await hub_records.find(client, query, timeout=10.0)
        return [(rec, ids.get(rec.engine_uuid)) for rec in records]

    async def hub_result(self, msg_id: str) -> tuple[bool, Any]:
        """Whether request ``msg_id`` ended, and its reply (``hub_records.result``)."""
        client = self._client
        if client is None:
            raise EngineDied("the cluster is not connected")
        return await hub_records.result(client, msg_id, timeout=10.0)

    async def signal(self, engine_id: int, sig: str) -> None:
        """Deliver ``sig`` through the engine's nanny; returns on the nanny's ack."""
        fut = self._client.send_signal(getattr(signal, sig), targets=[engine_id], block=False)
        await asyncio.wrap_future(fut)

    async def control_request(
        self, engine_id: int, msg_type: str, content: dict[str, Any]
    ) -> dict[str, Any]:
        """One request on the engine's control channel (``runtime.attempts``); its reply content.

        The engine's kernel serves the control channel in its own thread, so the answer
        comes while a task runs in the main thread.
        """
        client = self._client
        if client is None:
            raise EngineDied(f"engine {engine_id}: the cluster is not connected")
        idents, _targets = client._build_targets([engine_id])
        fut = client._send(client._control_stream, msg_type, content=content, ident=idents[0])
        reply = await asyncio.wrap_future(fut)
        answer = dict(reply["content"])
        if answer.get("status") != "ok":
            raise RuntimeError(f"{msg_type} to engine {engine_id} failed: {answer}")
        return answer

    async def start_engines(self, n: int) -> None:
        """Embedded mode: add ``n`` engines (there is no restart in ipyparallel)."""
        if not self.embedded or self._cluster is None:
            raise RuntimeError("cannot start engines in attached mode")
        await self._cluster.start_engines(n)

    # ------------------------------------------------------------------ remote engines
    async def plan_remote_engines(self) -> int:
        """Ask the engine hosts for their GPUs and lay out their slots; the engine count."""
        if self.remote.hosts and not self.remote.planned:
            await self.remote.plan()
        return self.remote.engine_count

    async def _start_remote_engines(self) -> None:
        self.remote.record = self.config.profile_dir / "remote-engines.json"
        await self.remote.reap_recorded()  # what a crashed server left on the hosts
        if not self.remote.hosts:
            return
        await self.plan_remote_engines()
        await self.remote.start_all(self._cluster, ENGINE_ARGS, IOLoop.current())

    def note_engine_placement(self, engine_id: int, info: dict[str, Any]) -> None:
        """Remember which remote slot an engine fills (from its setup report)."""
        key = f"{info.get('host', '')}/{info.get('slot', -1)}"
        if key in self.remote.slots:
            self.engine_slots[engine_id] = key

    def is_local(self, info: dict[str, Any]) -> bool:
        """Whether an engine's pid is one of this host's processes (its setup report says).

        Same boot and same PID namespace; a remote engine's pid is never used here.
        """
        theirs = str(info.get("process_namespace", ""))
        return bool(theirs) and theirs == self._process_namespace

    def engine_offers(self, common: frozenset[str]) -> list[frozenset[str]]:
        """Tag sets of the engines this server starts (``common``: every engine's tags).

        This host's engines, then each remote slot's (with ``gpu`` where the runtime will
        detect one). Attached mode: none (the operator's launcher decides).
        """
        if not self.embedded:
            return []
        offers = []
        if self.config.engines:
            offers.append(common | local_detected_tags())
        for slot in self.remote.slots.values():
            sees_gpu = bool(self.remote.gpus.get(slot.host.name)) and (
                slot.gpu is not None or slot.host.gpus != "per-engine"
            )
            offers.append(common | frozenset(slot.tags) | ({"gpu"} if sees_gpu else set()))
        return offers

    async def replace_engine(self, lost: int | None) -> None:
        """Start an engine where the lost one ran: its remote slot, else this host."""
        key = self.engine_slots.pop(lost, None) if lost is not None else None
        if key is None:
            await self.start_engines(1)
            return
        # A host that is unreachable (down, cut off) gets its engine back when it answers
        # again: the start is retried with backoff, and the pool reports degraded meanwhile.
        generation, delay = self.generation, 1.0
        while not self._closing and generation == self.generation and self._cluster is not None:
            try:
                await self.remote.start_slot(self._cluster, key, ENGINE_ARGS, IOLoop.current())
                return
            except Exception as exc:
                log.warning(
                    "could not start an engine in slot %s (%s); again in %.0f s", key, exc, delay
                )
            await asyncio.sleep(delay)
            delay = min(10.0, delay * 2)

    def engine_ids(self) -> list[int]:
        return [int(e) for e in self._client.ids] if self._client is not None else []

    @staticmethod
    def unwrap_error(exc: BaseException) -> BaseException:
        """Turn ipyparallel's EngineError (a RemoteError by name) into EngineDied."""
        if isinstance(exc, ipp_error.RemoteError) and exc.ename == "EngineError":
            return EngineDied(str(exc))
        return exc

    # ------------------------------------------------------------------ notifications
    def _on_registration(self, event: dict[str, Any], generation: int) -> None:
        """In a stream callback of the client (on the loop): handled in a later turn."""
        loop = self._loop
        if loop is None or loop.is_closed() or generation != self.generation:
            return
        eid = int(event["id"])
        if event.get("event") == "register":
            loop.call_soon(self._note_registered, eid)
        else:
            loop.call_soon(self._note_unregistered, eid)

    def _note_registered(self, eid: int) -> None:
        if eid in self._state.known_ids or self._closing:
            return
        self._state.known_ids.add(eid)
        self.callbacks.engine_registered(eid)

    def _note_unregistered(self, eid: int) -> None:
        if eid not in self._state.known_ids:
            return
        self._state.known_ids.discard(eid)
        if not self._closing:
            self.callbacks.engine_unregistered(eid)

    # ------------------------------------------------------------------ process hygiene
    def _cluster_file(self) -> Path:
        return self.config.profile_dir / "security" / f"cluster-{CLUSTER_ID}.json"

    def _cleanup_stale_cluster(self) -> None:
        """Kill what a previous, killed server left behind in this data dir."""
        path = self._cluster_file()
        if not path.exists():
            return
        log.warning("found a cluster left by a previous run (%s); stopping it", path)
        for pid in pids_in_cluster_file(path):
            kill_tree(pid)
        self._remove_connection_files()

    def _remove_connection_files(self) -> None:
        """The cluster file and the hub's connection files: a new hub must not find the
        old one's ports (its client would wait for an answer that never comes)."""
        remove_connection_files(self.config.profile_dir, CLUSTER_ID)

    def _cluster_pids(self) -> list[int]:
        """Pids of every process of the embedded cluster: launchers' records and children."""
        return cluster_pids(self._cluster_file(), self._cluster, self._hub_children)


def raise_error(result: Any) -> Any:
    """ipyparallel hands an engine's error back as the reply's result: raise it."""
    if isinstance(result, BaseException):
        raise result
    return result


def local_detected_tags() -> frozenset[str]:
    """Tags the runtime detects on this host's engines (they share its environment)."""
    return frozenset(detected_tags())
