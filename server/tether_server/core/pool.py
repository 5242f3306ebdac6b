"""The engine pool as the control core sees it: who is idle, who runs what, what
may be signalled, and when a lost engine is replaced.

``ControlCore`` owns one ``EnginePool``. The pool keeps the rules that protect
engines from stray signals in one place:

* an engine runs at most one task, named by (``current_task``, ``current_attempt``);
* a signal is only sent to an engine that runs exactly the (task, attempt) it is
  meant for, and whose runtime has *armed* its guard for it (``Engine.armed``):
  before that, a SIGINT could land outside the task and kill the engine;
* an engine with a signal in flight (sent, delivery not yet acknowledged by the
  nanny) takes no new task, so a late signal cannot hit the next one;
* lost engines are replaced up to ``target_engines`` (plus ``spare_engines``), counting
  the starts that were asked for and have not registered yet, so the pool is never
  over-started;
* warm spares (``spare_engines``) are ready engines that take no task: when an active
  engine is lost, an idle spare takes its place at once (no engine start on the critical
  path) and the replacement that is started becomes the new spare.
"""

from __future__ import annotations

from .escalation import SIGNALLED_STAGES
from .messages import KillEngine, SignalEngine, StartEngine
from .model import Engine, EngineState, EscalationStage, Task
from .records import InvariantViolation


class EnginePool:
    """Engines by id, plus the replacement bookkeeping."""

    def __init__(
        self, *, target_engines: int, replace_lost_engines: bool, spare_engines: int = 0
    ) -> None:
        if spare_engines < 0:
            raise ValueError("spare_engines must not be negative")
        self.engines: dict[int, Engine] = {}
        self.target_engines = target_engines
        self.spare_engines = spare_engines
        self.replace_lost_engines = replace_lost_engines
        self.requested_starts = 0
        """StartEngine instructions whose engine has not registered yet."""

    @property
    def running_count(self) -> int:
        return sum(1 for engine in self.engines.values() if engine.current_task is not None)

    def register(self, engine_id: int, now: float) -> Engine:
        """The engine joined (STARTING); a known id is returned unchanged."""
        engine = self.engines.get(engine_id)
        if engine is None:
            engine = Engine(engine_id, register_time=now, last_seen=now)
            self.engines[engine_id] = engine
            self.requested_starts = max(0, self.requested_starts - 1)
        return engine

    def dispatchable(self) -> list[Engine]:
        """Engines that may take a task now: active, IDLE and no signal in flight."""
        return [
            engine
            for engine in self.engines.values()
            if engine.state is EngineState.IDLE
            and engine.signals_in_flight == 0
            and not engine.spare
        ]

    def ready(self, engine: Engine) -> None:
        """A registered engine finished its setup: active while the pool is short, else spare."""
        engine.state = EngineState.IDLE
        engine.spare = self.spare_engines > 0 and self._active(besides=engine) >= self.target_engines

    def _active(self, besides: Engine | None = None) -> int:
        """Ready engines that take tasks (STARTING ones have no role yet)."""
        return sum(
            1
            for e in self.engines.values()
            if e is not besides
            and not e.spare
            and e.state in (EngineState.IDLE, EngineState.BUSY, EngineState.STOPPING)
        )

    def promote_spare(self) -> Engine | None:
        """An active engine is gone: an idle spare takes its place (None when there is none)."""
        if self._active() >= self.target_engines:
            return None
        for engine in sorted(self.engines.values(), key=lambda e: e.id):
            if engine.spare and engine.state is EngineState.IDLE:
                engine.spare = False
                return engine
        return None

    def assign(self, engine: Engine, task: Task) -> None:
        """Put (task, task.attempt) on an idle engine; its guard is not armed yet."""
        if engine.state is not EngineState.IDLE or engine.signals_in_flight:
            raise InvariantViolation(f"engine {engine.id} cannot take a task now")
        engine.state = EngineState.BUSY
        engine.current_task = task.id
        engine.current_attempt = task.attempt
        engine.armed = False

    def release(self, engine: Engine) -> None:
        """The engine's task ended; it is idle again unless it is being killed."""
        engine.current_task = None
        engine.armed = False
        engine.tasks_done += 1
        if engine.state is EngineState.BUSY:
            engine.state = EngineState.IDLE

    def engine_of(self, task: Task) -> Engine:
        """The engine running the active ``task``; a mismatch is a core bug."""
        engine = self.engines.get(task.engine_id) if task.engine_id is not None else None
        if engine is None or (engine.current_task, engine.current_attempt) != (
            task.id,
            task.attempt,
        ):
            raise InvariantViolation(f"active task {task.id} is not on its engine")
        return engine

    def running(self, task_id: str, attempt: int) -> Engine | None:
        """The engine whose current work is (task_id, attempt), if any."""
        for engine in self.engines.values():
            if (engine.current_task, engine.current_attempt) == (task_id, attempt):
                return engine
        return None

    def signal(self, engine: Engine, task: Task, stage: EscalationStage) -> SignalEngine:
        """Signal ``engine`` for (task, attempt), refusing anything that could miss."""
        if not (
            engine.armed
            and (engine.current_task, engine.current_attempt) == (task.id, task.attempt)
            and stage in SIGNALLED_STAGES
        ):
            raise InvariantViolation(f"refusing to send {stage.name} to engine {engine.id}")
        engine.signals_in_flight += 1
        return SignalEngine(engine.id, stage.name, task.id, task.attempt)

    def acknowledge_signal(self, engine_id: int, now: float) -> bool:
        """The nanny delivered one signal; True when the engine may be free now."""
        engine = self.engines.get(engine_id)
        if engine is None or engine.state is EngineState.LOST:
            return False
        engine.signals_in_flight = max(0, engine.signals_in_flight - 1)
        engine.last_seen = now
        return True

    def kill(self, engine: Engine, reason: str) -> KillEngine:
        """SIGKILL the engine; its death comes back as EngineLost."""
        engine.state = EngineState.STOPPING
        return KillEngine(engine.id, reason)

    def clear(self) -> None:
        """The whole cluster is gone: forget every engine and every start asked for.

        Engine ids are the hub's, and a new hub numbers its engines from 0 again, so
        nothing of the old table may be matched against the new one.
        """
        self.engines.clear()
        self.requested_starts = 0

    def mark_lost(self, engine: Engine, *, replace: bool) -> StartEngine | None:
        """The engine is gone; a StartEngine when the pool should get one back.

        The caller ends the engine's task first. Engines that are STOPPING still
        count as alive: their own loss will ask for their replacement.
        """
        engine.state = EngineState.LOST
        engine.current_task = None
        engine.armed = False
        engine.signals_in_flight = 0  # nobody is left to acknowledge them
        was_spare, engine.spare = engine.spare, False
        if not was_spare:
            self.promote_spare()
        alive = sum(1 for other in self.engines.values() if other.state is not EngineState.LOST)
        if (
            replace
            and self.replace_lost_engines
            and alive + self.requested_starts < self.target_engines + self.spare_engines
        ):
            self.requested_starts += 1
            return StartEngine(replaces=engine.id)
        return None
