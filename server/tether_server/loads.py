"""The engines' load as they report it themselves, wherever they run.

Each engine's runtime (``runtime/monitor.py``) measures its own process on its own host
every ``--load-interval`` (RSS, CPU %, the memory of the GPU it is pinned to) and sends
it over the data channel (``publish_data``); under ``--memory-limit`` it also checks its
RSS four times a second and reports at once when it is over. This module keeps the last
report per engine for ``GetCluster`` and /metrics, and applies the memory limit to
engines on other hosts (this host's engines are measured with psutil directly, see
``EngineDriver.resource_policy_loop``). No pid of a remote engine is used here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .core import messages as msg
from .core.model import EngineState

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["EngineLoad", "EngineLoads"]


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine's last report."""

    engine_id: int
    rss_bytes: int
    cpu_percent: float
    gpu_memory_used_bytes: int
    gpu_memory_total_bytes: int
    time: float
    """When the controller received it (POSIX seconds)."""
    task_id: str = ""
    attempt: int = 0
    """The attempt the engine had armed when it measured the RSS ("" / 0: none)."""


class EngineLoads:
    """Last load report per engine; the memory limit for engines on other hosts."""

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self._latest: dict[int, EngineLoad] = {}

    def latest(self, engine_id: int) -> EngineLoad | None:
        """The engine's last report, if it is still current (not older than 3 intervals)."""
        load = self._latest.get(engine_id)
        stale = 3 * self.ctl.config.load_interval_seconds + 2.0
        if load is None or time.time() - load.time > stale:
            return None
        return load

    def report(self, payload: Any, now: float) -> None:
        if not isinstance(payload, dict):
            return
        try:
            load = EngineLoad(
                engine_id=int(payload["engine_id"]),
                rss_bytes=int(payload.get("rss_bytes", 0)),
                cpu_percent=float(payload.get("cpu_percent", 0.0)),
                gpu_memory_used_bytes=int(payload.get("gpu_memory_used_bytes", 0)),
                gpu_memory_total_bytes=int(payload.get("gpu_memory_total_bytes", 0)),
                time=now,
                task_id=str(payload.get("task_id", "")),
                attempt=int(payload.get("attempt", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return
        self._latest[load.engine_id] = load
        self._forget_lost()
        self._apply_memory_limit(load, now)

    def _apply_memory_limit(self, load: EngineLoad, now: float) -> None:
        limit = self.ctl.config.memory_limit_bytes
        if not limit or load.rss_bytes <= limit:
            return
        if self.ctl.supervisor.local_pid(load.engine_id):
            return  # this host's engine: the psutil loop watches it
        engine = self.ctl.core_or_raise().engines.get(load.engine_id)
        # Measured while this very attempt was armed: its memory, not the last task's.
        if (
            engine is None
            or engine.state is not EngineState.BUSY
            or engine.current_task is None
            or (engine.current_task, engine.current_attempt) != (load.task_id, load.attempt)
        ):
            return
        self.ctl.handle(
            msg.ResourceLimitExceeded(
                engine.id,
                engine.current_task,
                engine.current_attempt,
                f"engine RSS {load.rss_bytes} bytes over the limit of {limit} bytes "
                f"(measured on its host)",
                now,
            )
        )

    def _forget_lost(self) -> None:
        engines = self.ctl.core_or_raise().engines
        for engine_id in [i for i in self._latest if i not in engines]:
            del self._latest[engine_id]
