"""Engine hosts: which other machines get engines, how many, and which GPU each one uses.

A host is named on the command line (``--engine-hosts h2=2,root@10.0.0.7:2222=4``) or in
a TOML file (``--hosts-file``)::

    [hosts.h2]
    ssh = "root@10.0.0.7:2222"   # ssh destination (default: the table's name)
    engines = 2                  # default: one per GPU, or 1 on a host without GPUs
    tags = ["big-memory"]        # carried by every engine of the host
    gpus = "per-engine"          # or "none": no pinning, no gpu:<i> tags

Each engine of a host has a *slot* (0, 1, ...): a lost engine is replaced in its own slot,
so the host keeps its share and a GPU host keeps one engine per GPU. This module is pure
(no I/O): probing a host's GPUs is :mod:`.ssh`'s job; :func:`plan_slots` turns what was
found into slots.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EngineHost",
    "EngineSlot",
    "GpuInfo",
    "SshSettings",
    "parse_engine_hosts",
    "parse_gpu_listing",
    "plan_slots",
    "read_hosts_file",
    "ssh_command",
]

GPU_PER_ENGINE = "per-engine"
GPU_NONE = "none"
GPU_MODES = (GPU_PER_ENGINE, GPU_NONE)


@dataclass(frozen=True, slots=True)
class EngineHost:
    """One machine that runs engines placed by ipyparallel's SSH launcher."""

    name: str
    """How tether names the host (GetCluster, logs, placement)."""
    ssh: str
    """``[user@]address[:port]``, as ipyparallel's SSH launcher takes it."""
    engines: int | None = None
    """Engines to keep there; None: one per GPU (1 without GPUs)."""
    tags: tuple[str, ...] = ()
    gpus: str = GPU_PER_ENGINE


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as ``nvidia-smi --query-gpu=index,memory.total`` lists it."""

    index: int
    memory_total_bytes: int


@dataclass(frozen=True, slots=True)
class EngineSlot:
    """A place for one engine: a host and, on GPU hosts, the GPU it is pinned to."""

    host: EngineHost
    slot: int
    gpu: int | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"{self.host.name}/{self.slot}"

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What the engine's process gets: ``extra``, its host, slot, tags and visible GPUs."""
        env = {
            **(extra or {}),
            "TETHER_ENGINE_HOST": self.host.name,
            "TETHER_ENGINE_SLOT": str(self.slot),
            "TETHER_ENGINE_TAGS": ",".join(self.tags),
        }
        if self.host.gpus == GPU_PER_ENGINE:
            env["CUDA_VISIBLE_DEVICES"] = "" if self.gpu is None else str(self.gpu)
        return env


def _host_of(destination: str) -> str:
    """``user@address:port`` -> ``address``."""
    return destination.rpartition("@")[2].partition(":")[0]


def parse_engine_hosts(text: str) -> list[EngineHost]:
    """``DEST=N,DEST,...`` (``N`` omitted or ``auto``: one engine per GPU)."""
    hosts: list[EngineHost] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        destination, _, count = item.partition("=")
        destination = destination.strip()
        if not _host_of(destination):
            raise ValueError(f"--engine-hosts: {item!r} names no host")
        engines: int | None = None
        if count.strip() not in ("", "auto"):
            try:
                engines = int(count)
            except ValueError:
                raise ValueError(f"--engine-hosts: {item!r}: engines must be a number") from None
            if engines < 0:
                raise ValueError(f"--engine-hosts: {item!r}: engines must not be negative")
        hosts.append(EngineHost(name=_host_of(destination), ssh=destination, engines=engines))
    _check_unique(hosts)
    return hosts


def read_hosts_file(path: Path) -> list[EngineHost]:
    """The ``[hosts.NAME]`` tables of a TOML file (see the module docstring)."""
    data = tomllib.loads(path.read_text())
    table = data.get("hosts", {})
    if not isinstance(table, dict):
        raise ValueError("[hosts] must be a table of tables")
    hosts = []
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ValueError(f"[hosts.{name}] must be a table")
        unknown = set(entry) - {"ssh", "engines", "tags", "gpus"}
        if unknown:
            raise ValueError(f"[hosts.{name}]: unknown keys {sorted(unknown)}")
        engines = entry.get("engines")
        if engines is not None and (not isinstance(engines, int) or engines < 0):
            raise ValueError(f"[hosts.{name}]: engines must be a number >= 0")
        gpus = str(entry.get("gpus", GPU_PER_ENGINE))
        if gpus not in GPU_MODES:
            raise ValueError(f"[hosts.{name}]: gpus must be one of {GPU_MODES}")
        tags = entry.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"[hosts.{name}]: tags must be a list of strings")
        hosts.append(
            EngineHost(
                name=str(name),
                ssh=str(entry.get("ssh", name)),
                engines=engines,
                tags=tuple(tags),
                gpus=gpus,
            )
        )
    _check_unique(hosts)
    return hosts


def _check_unique(hosts: list[EngineHost]) -> None:
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ValueError("a host is named twice")


def parse_gpu_listing(text: str) -> list[GpuInfo]:
    """Lines ``index, memory.total`` (MiB) of ``nvidia-smi --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            continue
        try:
            gpus.append(GpuInfo(int(parts[0]), int(float(parts[1]) * 1024 * 1024)))
        except ValueError:
            continue
    return gpus


def plan_slots(host: EngineHost, gpus: list[GpuInfo], *, default_tags: bool) -> list[EngineSlot]:
    """The host's engine slots: one per GPU by default, pinned and tagged ``gpu``, ``gpu:<i>``.

    With ``gpus = "none"`` (or no GPU found) no engine is pinned. With more engines than
    GPUs, the engines beyond the GPU count see no GPU (``CUDA_VISIBLE_DEVICES=""``) and
    carry no gpu tag. ``default_tags`` False leaves the gpu tags out (--no-gpu-tags).
    """
    pinned = host.gpus == GPU_PER_ENGINE and bool(gpus)
    count = host.engines if host.engines is not None else (len(gpus) if pinned else 1)
    slots = []
    for slot in range(count):
        gpu = gpus[slot].index if pinned and slot < len(gpus) else None
        tags = list(host.tags)
        if gpu is not None and default_tags:
            tags += ["gpu", f"gpu:{gpu}"]
        slots.append(EngineSlot(host, slot, gpu, tuple(tags)))
    return slots


@dataclass(frozen=True, slots=True)
class SshSettings:
    """How tether reaches its engine hosts."""

    identity_file: Path | None = None
    options: tuple[str, ...] = ()
    """``-o`` options (``StrictHostKeyChecking=accept-new``, ...)."""
    remote_python: str = field(default_factory=lambda: sys.executable)
    """The Python with tether installed, on the engine hosts (default: this one's path)."""
    gpu_tags: bool = True
    """Tag pinned engines ``gpu`` and ``gpu:<index>``."""
    environment: tuple[tuple[str, str], ...] = ()
    """Variables every remote engine gets (``--remote-env``), e.g. PYTHONPATH, HF_HOME."""

    def args(self) -> list[str]:
        """Arguments of every ssh and scp call (keep-alives: a lost host fails, never hangs)."""
        args = ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        args += ["-o", "ConnectTimeout=10"]
        if self.identity_file is not None:
            args += ["-i", str(self.identity_file)]
        for option in self.options:
            args += ["-o", option]
        return args


def _split(destination: str) -> tuple[str, str | None]:
    """``user@host:port`` -> (``user@host``, port)."""
    user_host, _, port = destination.partition(":")
    return user_host, port or None


def ssh_command(settings: SshSettings, destination: str, command: str) -> list[str]:
    target, port = _split(destination)
    return ["ssh", *settings.args(), *(["-p", port] if port else []), target, command]
