"""The engine pool as the control core sees it: who is idle, who runs what, what
may be signalled, and when a lost engine is replaced.

``ControlCore`` owns one ``EnginePool``. The pool keeps the rules that protect
engines from stray signals in one place:

* an engine runs at most one task, named by (``current_task``, ``current_attempt``),
  and with pipelined dispatch (``pipeline_depth`` N > 1) holds up to N - 1 more queued
  behind it, in the order it runs them (the first is ``queued_task``,
  ``queued_attempt``), so it never idles for a round trip. How many it may hold is the
  core's decision (``core/pipeline.py``: one, unless every task on it is known short);
* a signal is only sent to an engine that runs exactly the (task, attempt) it is
  meant for. The signal names its attempt and the engine raises it only for that one
  (``runtime.attempts``), holding it until the attempt begins if it has not yet: a
  signal that arrives after its task ended never touches the queued one, and one that
  arrives early never lands outside the task;
* an engine with a signal in flight (sent, delivery not yet acknowledged) takes no
  new task, neither to run nor to queue;
* lost engines are replaced up to ``target_engines`` (plus ``spare_engines``), counting
  the starts that were asked for and have not registered yet, so the pool is never
  over-started;
* warm spares (``spare_engines``) are ready engines that take no task: when an active
  engine is lost, an idle spare takes its place at once (no engine start on the critical
  path) and the replacement that is started becomes the new spare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .escalation import SIGNALLED_STAGES
from .messages import KillEngine, SignalEngine, StartEngine
from .model import Engine, EngineState, EscalationStage, Task
from .records import InvariantViolation

MAX_PIPELINE_DEPTH = 32
"""Tasks one engine may hold (running + queued) at most, whatever the configuration says."""


@dataclass(slots=True)
class QueuedAttempt:
    """What the pool knows of the attempt queued behind an engine's running task."""

    task_id: str
    attempt: int
    early: list[object] = field(default_factory=list)
    """Reports of the attempt that came before the running one's end (the engine ran
    both; replies and IOPub travel apart): replayed, in order, at its turn."""
    cancel: object | None = None
    """The ``InterruptRequested`` that arrived while it was queued, waiting for the
    engine's answer to the withdrawal."""
    withdrawing: bool = False
    """A ``Withdraw`` of the attempt is unanswered."""
    began: bool = False
    """The engine said it had begun (a withdrawal came too late)."""


class EnginePool:
    """Engines by id, plus the replacement bookkeeping."""

    def __init__(
        self,
        *,
        target_engines: int,
        replace_lost_engines: bool,
        spare_engines: int = 0,
        pipeline_depth: int = 1,
    ) -> None:
        if spare_engines < 0:
            raise ValueError("spare_engines must not be negative")
        if not 1 <= pipeline_depth <= MAX_PIPELINE_DEPTH:
            raise ValueError(f"pipeline_depth must be 1 to {MAX_PIPELINE_DEPTH}")
        self.engines: dict[int, Engine] = {}
        self.pipeline_depth = pipeline_depth
        self._slots: dict[tuple[str, int], Engine] = {}
        """Engines by the (task, attempt) queued behind their running task."""
        self._queued: dict[int, list[QueuedAttempt]] = {}
        """The queued attempts of each engine that has some, by engine id, in the order
        the engine runs them."""
        self.target_engines = target_engines
        self.spare_engines = spare_engines
        self.replace_lost_engines = replace_lost_engines
        self.requested_starts = 0
        """StartEngine instructions whose engine has not registered yet."""
        self.unready: set[int] = set()
        """Engines that run an adopted task (``adopt``) and whose setup has not answered
        yet: they take no new task until it does (their tags are not known)."""

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
            and engine.queued_task is None
            and not engine.spare
            and engine.id not in self.unready
        ]

    def ready(self, engine: Engine) -> None:
        """A registered engine finished its setup: active while the pool is short, else spare.

        An engine that ran an adopted task meanwhile (``adopt``) keeps what it does."""
        if engine.id in self.unready:
            self.unready.discard(engine.id)
            engine.spare = False
            return
        engine.state = EngineState.IDLE
        engine.spare = (
            self.spare_engines > 0 and self._active(besides=engine) >= self.target_engines
        )

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

    def queueable(self) -> list[Engine]:
        """Engines that may take a task behind their running one (pipelined dispatch),
        room permitting (``room``)."""
        if self.pipeline_depth < 2:
            return []
        return [
            engine
            for engine in self.engines.values()
            if engine.state is EngineState.BUSY
            and engine.current_task is not None
            and engine.signals_in_flight == 0
            and not engine.spare
            and engine.id not in self.unready
        ]

    def queue_behind(self, engine: Engine, task: Task) -> None:
        """Queue (task, task.attempt) behind what ``engine`` runs and holds already (how
        deep is the core's choice, ``pipeline.room``; a restarted controller takes up
        what the engine holds, whatever its own depth)."""
        if engine.state is not EngineState.BUSY:
            raise InvariantViolation(f"engine {engine.id} cannot queue a task now")
        self._queued.setdefault(engine.id, []).append(QueuedAttempt(task.id, task.attempt))
        self._slots[(task.id, task.attempt)] = engine
        self._name_head(engine)

    def queued_on(self, task_id: str, attempt: int) -> Engine | None:
        """The engine holding (task_id, attempt) queued behind its running task, if any."""
        return self._slots.get((task_id, attempt))

    def queued(self) -> list[tuple[Engine, QueuedAttempt]]:
        """Every queued attempt with its engine (each engine's in the order it runs them)."""
        return [
            (self.engines[engine_id], q) for engine_id, queue in self._queued.items() for q in queue
        ]

    def queue_of(self, engine: Engine) -> list[QueuedAttempt]:
        """The attempts queued on ``engine``, in the order it runs them (a copy)."""
        return list(self._queued.get(engine.id, ()))

    @property
    def queued_count(self) -> int:
        """Tasks queued behind running ones."""
        return len(self._slots)

    def slot(self, engine: Engine) -> QueuedAttempt | None:
        """The attempt ``engine`` runs next (the first queued), if any."""
        queue = self._queued.get(engine.id)
        return queue[0] if queue else None

    def slot_of(self, task_id: str, attempt: int) -> QueuedAttempt | None:
        """What the pool knows of queued (task_id, attempt), if it is queued."""
        engine = self._slots.get((task_id, attempt))
        if engine is None:
            return None
        for queued in self._queued[engine.id]:
            if (queued.task_id, queued.attempt) == (task_id, attempt):
                return queued
        raise InvariantViolation(f"{task_id} attempt {attempt} is queued nowhere")

    def unqueue(self, engine: Engine, queued: QueuedAttempt | None = None) -> QueuedAttempt:
        """Take ``queued`` (default: the first) off ``engine`` and return it."""
        queue = self._queued[engine.id]
        if queued is None:
            queued = queue[0]
        queue.remove(queued)
        if not queue:
            del self._queued[engine.id]
        self._slots.pop((queued.task_id, queued.attempt), None)
        self._name_head(engine)
        return queued

    def _name_head(self, engine: Engine) -> None:
        head = self.slot(engine)
        engine.queued_count = len(self._queued.get(engine.id, ()))
        engine.queued_task = None if head is None else head.task_id
        engine.queued_attempt = 0 if head is None else head.attempt

    def assign(self, engine: Engine, task: Task) -> None:
        """Put (task, task.attempt) on an idle engine."""
        if engine.state is not EngineState.IDLE:
            raise InvariantViolation(f"engine {engine.id} cannot take a task now")
        engine.state = EngineState.BUSY
        engine.current_task = task.id
        engine.current_attempt = task.attempt

    def adopt(self, engine: Engine, task: Task) -> None:
        """Attached mode, after a restart: ``engine`` runs (task, task.attempt), which a
        previous controller dispatched and which has begun. An engine
        whose setup is still queued behind that task stays out of dispatch until it
        answers (``ready``)."""
        if engine.state not in (EngineState.STARTING, EngineState.IDLE):
            raise InvariantViolation(f"engine {engine.id} cannot adopt a task now")
        if engine.state is EngineState.STARTING:
            self.unready.add(engine.id)
        engine.state = EngineState.BUSY
        engine.current_task = task.id
        engine.current_attempt = task.attempt

    def release(self, engine: Engine) -> None:
        """The engine's task ended; it is idle again unless it is being killed."""
        engine.current_task = None
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
            (engine.current_task, engine.current_attempt) == (task.id, task.attempt)
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
        self.unready.clear()
        self._slots.clear()
        self._queued.clear()
        self.requested_starts = 0

    def mark_lost(self, engine: Engine, *, replace: bool) -> StartEngine | None:
        """The engine is gone; a StartEngine when the pool should get one back.

        The caller ends the engine's task first. Engines that are STOPPING still
        count as alive: their own loss will ask for their replacement.
        """
        engine.state = EngineState.LOST
        self.unready.discard(engine.id)
        engine.current_task = None
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
