"""Engines on other hosts, placed by ipyparallel's own SSH launcher.

tether does not schedule across machines: every remote engine is started by
``SSHEngineSetLauncher`` (ipyparallel 9.2), one engine set per engine *slot*
(:mod:`.hosts`), so a lost engine can be started again in its own slot, on its own
host, with its own GPU. What tether adds around the launcher:

* **nothing blocks the service loop.** The launcher's ``start`` is a dozen blocking ssh
  and scp calls per engine; here it runs on a worker thread, with the launchers' IOLoop
  fixed to the service loop first (a launcher that captured a thread's loop would lose
  its stop notifications, shared/notes/ipyparallel.md). Stopping kills each engine with
  one ssh call (SIGTERM, then SIGKILL after a grace), also off the loop, and skips the
  launcher's fetch of the remote log (up to 10 s of scp retries per engine).
* **the remote pids stay remote.** They are only ever used in commands run on their own
  host over ssh, never with ``os.kill`` or psutil here.
* **GPUs are found with nvidia-smi on the host** (over ssh), before its slots are planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ipyparallel.cluster.launcher import SSHEngineLauncher, SSHEngineSetLauncher
from tornado.ioloop import IOLoop

from .hosts import (
    EngineHost,
    EngineSlot,
    GpuInfo,
    SshSettings,
    parse_gpu_listing,
    plan_slots,
    ssh_command,
)

log = logging.getLogger(__name__)

GPU_QUERY = "nvidia-smi --query-gpu=index,memory.total --format=csv,noheader,nounits"
STOP_GRACE_SECONDS = 3.0
"""How long a remote engine gets to exit on SIGTERM before it is SIGKILLed."""


class _QuietSSHEngineLauncher(SSHEngineLauncher):  # type: ignore[misc]
    """ipyparallel's SSH engine launcher without the fetch of the remote log at its stop."""

    def get_output(self, remove: bool = False) -> str:
        return ""


class _EngineSetLauncher(SSHEngineSetLauncher):  # type: ignore[misc]
    """One engine set of one slot: started on a thread, stopped with one ssh call."""

    launcher_class = _QuietSSHEngineLauncher

    def get_output(self, remove: bool = False) -> str:
        return ""

    async def stop(self) -> bool:
        """Stop the set's engine on its host; False when the host could not be reached."""
        done = await asyncio.gather(
            *(asyncio.to_thread(_stop_engine, el) for el in self.launchers.values())
        )
        return all(done)


def _stop_engine(launcher: Any) -> bool:
    """Stop one remote engine on its host; False when its host could not be reached."""
    pid = int(getattr(launcher, "pid", 0) or 0)
    ssh = [*launcher.ssh_cmd, *launcher.ssh_args, launcher.location]
    stopped = _stop_remote_pid(ssh, pid)
    if stopped:
        with contextlib.suppress(Exception):
            launcher._stop_waiting.set()
    return stopped


def _stop_remote_pid(ssh: list[str], pid: int) -> bool:
    """SIGTERM ``pid`` on the host ``ssh`` reaches, SIGKILL after the grace; False: unreachable."""
    if pid <= 0:
        return True
    # TERM, wait up to the grace, then KILL; one round trip.
    # A pid reused by another process since (a record from a crashed run) is left alone.
    script = (
        f"if [ -r /proc/{pid}/cmdline ] && ! grep -q ipyparallel /proc/{pid}/cmdline; "
        "then exit 0; fi; "
        f"kill -TERM {pid} 2>/dev/null; i=0; "
        f"while kill -0 {pid} 2>/dev/null && [ $i -lt {int(STOP_GRACE_SECONDS * 10)} ]; "
        f"do sleep 0.1; i=$((i+1)); done; kill -KILL {pid} 2>/dev/null; true"
    )
    try:
        done = subprocess.run([*ssh, script], capture_output=True, timeout=STOP_GRACE_SECONDS + 15)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not stop engine pid %s on %s: %s", pid, ssh[-1], exc)
        return False
    if done.returncode == 255:  # ssh's own failure: the host is unreachable
        log.warning("could not reach %s to stop engine pid %s", ssh[-1], pid)
        return False
    return True


class RemoteEngines:
    """The engine slots of every configured host, and the launchers that fill them."""

    def __init__(self, hosts: Iterable[EngineHost], settings: SshSettings) -> None:
        self.hosts = list(hosts)
        self.settings = settings
        self.slots: dict[str, EngineSlot] = {}
        """Planned slots by key (``host/slot``), filled by :meth:`plan`."""
        self.gpus: dict[str, list[GpuInfo]] = {}
        self._sets: dict[str, Any] = {}
        """The running engine-set launcher of each slot."""
        self._counter = 0
        self._unstopped: dict[str, list[Any]] = {}
        """Per slot, launchers of engines that could not be stopped yet (host unreachable)."""
        self.record: Path | None = None
        """Where the running remote engines are written down (host, pid), so that a start
        after a crash (tether SIGKILLed) can stop what the crashed server left running."""

    @property
    def planned(self) -> bool:
        return bool(self.slots) or not self.hosts

    @property
    def engine_count(self) -> int:
        """Engines the hosts are meant to hold (known once planned; else the configured counts)."""
        if self.slots:
            return len(self.slots)
        return sum(1 if h.engines is None else h.engines for h in self.hosts)

    def tags_offered(self) -> frozenset[str]:
        """Every tag an engine of some configured host carries or will carry."""
        tags: set[str] = set()
        for slot in self.slots.values():
            tags.update(slot.tags)
        for host in self.hosts:
            tags.update(host.tags)
        return frozenset(tags)

    # ------------------------------------------------------------------ planning
    async def plan(self) -> None:
        """Ask every host for its GPUs (in parallel) and lay out its slots."""
        found = await asyncio.gather(*(self._probe_gpus(h) for h in self.hosts))
        self.slots = {}
        for host, gpus in zip(self.hosts, found, strict=True):
            self.gpus[host.name] = gpus
            for slot in plan_slots(host, gpus, default_tags=self.settings.gpu_tags):
                self.slots[slot.key] = slot

    async def _probe_gpus(self, host: EngineHost) -> list[GpuInfo]:
        cmd = ssh_command(self.settings, host.ssh, f"{GPU_QUERY} 2>/dev/null || true")
        try:
            done = await asyncio.to_thread(
                subprocess.run, cmd, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not ask %s for its GPUs: %s", host.name, exc)
            return []
        if done.returncode != 0:
            log.warning("could not reach %s: %s", host.name, done.stderr.strip())
        return parse_gpu_listing(done.stdout)

    # ------------------------------------------------------------------ engines
    async def start_slot(
        self, cluster: Any, key: str, engine_args: list[str], loop: IOLoop
    ) -> None:
        """Start the engine of one slot through ipyparallel's SSH engine-set launcher."""
        slot = self.slots[key]
        self._counter += 1
        set_id = f"{slot.host.name}-{slot.slot}-{self._counter}"
        # The launcher passes these overrides to the engine's launcher: its environment
        # (host, slot, tags, GPU) and the service loop, captured here on the loop thread.
        overrides = {
            "n": 1,
            "environment": slot.environment(dict(self.settings.environment)),
            "loop": loop,
        }
        launcher = _EngineSetLauncher(
            work_dir=".",
            parent=cluster,
            log=logging.getLogger("tether_server.cluster.launcher"),
            profile_dir=cluster.profile_dir,
            cluster_id=cluster.cluster_id,
            engine_set_id=set_id,
            engines={slot.host.ssh: overrides},
            ssh_args=self.settings.args(),
            scp_args=self.settings.args(),
            remote_python=self.settings.remote_python,
            engine_args=list(engine_args),
            loop=loop,
        )
        # The slot's previous engine is lost to the hub, which is why the slot is filled
        # again; it may still run (its host was cut off): stop it there first. An engine
        # that cannot be stopped now is tried again at the slot's next start.
        stale = self._unstopped.pop(key, [])
        old = self._sets.pop(key, None)
        if old is not None:
            stale.append(old)
        for previous in stale:
            if not await previous.stop():
                self._unstopped.setdefault(key, []).append(previous)
        if self._unstopped.get(key):
            # Not before the old engine is stopped: a host that comes back in between
            # would otherwise run two engines in one slot.
            raise ConnectionError(f"{slot.host.name} unreachable: its old engine still runs")
        self._sets[key] = launcher
        try:
            await asyncio.to_thread(launcher.start, 1)
        finally:
            self._write_record()  # also an engine that started before a later step failed
        log.info("engine started on %s (slot %s)", slot.host.name, slot.slot)

    async def start_all(self, cluster: Any, engine_args: list[str], loop: IOLoop) -> None:
        """Fill every slot; hosts in parallel, slots of one host one after the other."""

        async def fill(host: EngineHost) -> None:
            for key in [k for k, s in self.slots.items() if s.host is host]:
                await self.start_slot(cluster, key, engine_args, loop)

        results = await asyncio.gather(*(fill(h) for h in self.hosts), return_exceptions=True)
        for host, result in zip(self.hosts, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not start engines on %s: %s", host.name, result)

    async def stop_all(self, timeout: float = STOP_GRACE_SECONDS + 20) -> None:
        """Stop every remote engine (SIGTERM, then SIGKILL) on its own host."""
        sets, self._sets = list(self._sets.values()), {}
        sets += [s for stale in self._unstopped.values() for s in stale]
        self._unstopped = {}
        if not sets:
            return
        try:
            stopped = await asyncio.wait_for(asyncio.gather(*(s.stop() for s in sets)), timeout)
        except TimeoutError:
            log.warning("remote engines did not all stop within %.0f s", timeout)
            return
        if all(stopped):
            self._write_record()

    # ------------------------------------------------------------------ crash recovery
    def _write_record(self) -> None:
        if self.record is None:
            return
        running = [
            {"ssh": [*el.ssh_cmd, *el.ssh_args, el.location], "pid": int(el.pid)}
            for s in [*self._sets.values(), *(x for v in self._unstopped.values() for x in v)]
            for el in s.launchers.values()
            if int(getattr(el, "pid", 0) or 0) > 0
        ]
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.record.with_suffix(".tmp")
            tmp.write_text(json.dumps(running))
            tmp.replace(self.record)
        except OSError as exc:
            log.warning("could not write %s: %s", self.record, exc)

    async def reap_recorded(self) -> None:
        """Stop the remote engines a crashed server left running (from :attr:`record`)."""
        if self.record is None or not self.record.exists():
            return
        try:
            entries = json.loads(self.record.read_text())
        except (OSError, ValueError):
            entries = []
        valid = [e for e in entries if isinstance(e, dict) and e.get("ssh") and e.get("pid")]
        if valid:
            log.warning("stopping %d remote engines left by a previous run", len(valid))
            await asyncio.gather(
                *(asyncio.to_thread(_stop_remote_pid, list(e["ssh"]), int(e["pid"])) for e in valid)
            )
        with contextlib.suppress(OSError):
            self.record.unlink()

    def describe(self) -> str:
        return ", ".join(
            f"{h.name}={sum(1 for s in self.slots.values() if s.host is h)}" for h in self.hosts
        ) + (f" via {shlex.join(self.settings.args())}" if self.settings.options else "")
