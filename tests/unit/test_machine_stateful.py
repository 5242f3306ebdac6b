"""The control core under random event sequences (hypothesis stateful testing).

A model of the outside world (engines that start, finish, die; timers that
fire; nannies that acknowledge signals; clients that submit and interrupt) drives
``ControlCore`` and checks, after every step, the invariants the rest of tether
relies on:

* every task's published states follow ``LEGAL_TRANSITIONS``; nothing is
  published for a task after its terminal event;
* revisions strictly increase, and each task carries its latest one;
* an engine runs at most one task, and the engine and task tables agree;
* a signal only goes to the engine that runs exactly its (task, attempt), one that was
  dispatched there (the engine holds it if the attempt has not begun);
* no task is dispatched to an engine with a signal in flight, or after shutdown;
* the pool is never asked to grow past its target;
* draining the world (finish everything, fire every timer) ends every task,
  except PENDING ones kept for after a shutdown.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tether_server.core.errors import ShuttingDown, TaskAlreadyTerminal, TaskNotFound
from tether_server.core.machine import ALREADY_ENDED, ControlCore
from tether_server.core.messages import (
    CancelTimers,
    Dispatch,
    EngineLost,
    EngineReady,
    EngineRegistered,
    Event,
    Instruction,
    InterruptRequested,
    Outcome,
    OutcomeStatus,
    Publish,
    ResourceLimitExceeded,
    ShutdownRequested,
    SignalDelivered,
    SignalEngine,
    StartEngine,
    StartTimer,
    TaskFinished,
    TaskOutput,
    TaskProgressed,
    TaskSubmitted,
    TimerFired,
    TimerKey,
    TimerKind,
    Withdraw,
    Withdrawn,
)
from tether_server.core.model import (
    AttemptEnding,
    EngineState,
    ErrorReason,
    EscalationStage,
    GracePeriods,
    InterruptCause,
    RetryPolicy,
    Task,
    TaskState,
)
from tether_server.core.records import LEGAL_TRANSITIONS

GRACE = GracePeriods(sigint=1.0, sigterm=1.0, sigkill=1.0)
TARGET_ENGINES = 2
GPU = frozenset({"gpu"})


def retry_policy(backoff: float) -> RetryPolicy:
    """The retry policy of generated tasks: every retryable reason, three attempts."""
    reasons = {
        ErrorReason.ENGINE_LOST,
        ErrorReason.TASK_RAISED,
        ErrorReason.TIMED_OUT,
        ErrorReason.RESOURCE_LIMIT,
        ErrorReason.CLUSTER_LOST,
    }
    return RetryPolicy(
        max_attempts=3,
        retry_on=frozenset(reasons),
        initial_backoff=backoff,
        max_backoff=max(backoff, 1.0),
        jitter=0.0,
    )


class ControlCoreWorld(RuleBasedStateMachine):
    PIPELINE_DEPTH = 1

    def __init__(self) -> None:
        super().__init__()
        self.core = ControlCore(
            target_engines=TARGET_ENGINES,
            replace_lost_engines=True,
            default_grace=GRACE,
            max_output_chars=8,
            preempt_min_runtime=1.0,
            uniform=lambda: 0.5,
            pipeline_depth=self.PIPELINE_DEPTH,
        )
        self.withdrawals: dict[tuple[int, str, int], None] = {}  # unanswered Withdraws
        self.now = 0.0
        self.task_ids = (f"t{n}" for n in itertools.count())
        self.engine_ids = itertools.count()
        self.timers: dict[TimerKey, None] = {}  # an ordered set of armed timers
        self.requested_starts = 0
        self.history: dict[str, list[TaskState]] = {}
        self.last_publish: dict[str, int] = {}
        self.last_revision = 0
        self.broken = False
        self.dispatched: set[tuple[str, int, int]] = set()  # (task, attempt, engine) sent

    # ------------------------------------------------------------------ plumbing
    def tick(self) -> float:
        self.now += 0.5
        return self.now

    def apply(self, event: Event) -> list[Instruction]:
        was_shutting_down = self.core.shutting_down
        try:
            out = self.core.handle(event)
            for instruction in out:
                self.absorb(instruction, was_shutting_down)
        except AssertionError:
            self.broken = True  # teardown must not pile a second failure on this one
            raise
        return out

    def absorb(self, instruction: Instruction, was_shutting_down: bool) -> None:
        core = self.core
        match instruction:
            case Publish(revision=revision, task=snapshot):
                assert revision > self.last_revision, "revisions must strictly increase"
                self.last_revision = revision
                assert snapshot.revision == revision
                seen = self.history.setdefault(snapshot.id, [])
                if seen:
                    assert not seen[-1].terminal, f"{snapshot.id} changed after {seen[-1]}"
                    if snapshot.state is not seen[-1]:
                        assert snapshot.state in LEGAL_TRANSITIONS[seen[-1]], (seen, snapshot.state)
                else:
                    assert snapshot.state is TaskState.PENDING
                seen.append(snapshot.state)
                self.last_publish[snapshot.id] = revision
            case StartTimer(key=key):
                self.timers[key] = None
            case CancelTimers(task_id=task_id):
                assert core.tasks[task_id].state.terminal
                for key in [k for k in self.timers if k.task_id == task_id]:
                    del self.timers[key]
            case SignalEngine(engine_id=engine_id, task_id=task_id, attempt=attempt):
                engine = core.engines[engine_id]
                assert (task_id, attempt, engine_id) in self.dispatched, "never sent there"
                assert (engine.current_task, engine.current_attempt) == (task_id, attempt)
            case Dispatch(task_id=task_id, attempt=attempt, engine_id=engine_id):
                self.dispatched.add((task_id, attempt, engine_id))
                assert not was_shutting_down
                assert core.engines[engine_id].signals_in_flight == 0
            case Withdraw(engine_id=engine_id, task_id=task_id, attempt=attempt):
                queue = core._pool.queue_of(core.engines[engine_id])
                assert (task_id, attempt) in [(q.task_id, q.attempt) for q in queue]
                self.withdrawals[(engine_id, task_id, attempt)] = None
            case StartEngine():
                self.requested_starts += 1
                alive = sum(e.state is not EngineState.LOST for e in core.engines.values())
                assert alive + core.requested_engine_starts <= TARGET_ENGINES
            case _:
                pass

    def engines_in(self, *states: EngineState) -> list[int]:
        return [e.id for e in self.core.engines.values() if e.state in states]

    def busy(self) -> list[int]:
        return [e.id for e in self.core.engines.values() if e.current_task is not None]

    def new_engine(self, tags: frozenset[str], *, ready: bool) -> None:
        engine_id = next(self.engine_ids)
        self.apply(EngineRegistered(engine_id, self.tick()))
        self.requested_starts = max(0, self.requested_starts - 1)
        if ready:
            self.apply(EngineReady(engine_id, "node", 100 + engine_id, tags, self.tick()))

    def finish(self, engine_id: int, outcome: Outcome) -> None:
        engine = self.core.engines[engine_id]
        assert engine.current_task is not None
        self.apply(TaskFinished(engine.current_task, engine.current_attempt, outcome, self.tick()))

    # ------------------------------------------------------------------ clients
    @initialize(gpus=st.lists(st.booleans(), min_size=1, max_size=TARGET_ENGINES))
    def cluster_starts(self, gpus: list[bool]) -> None:
        for gpu in gpus:
            self.new_engine(GPU if gpu else frozenset(), ready=True)

    @rule(
        priority=st.integers(0, 2),
        gpu=st.booleans(),
        timeout=st.none() | st.just(2.0),
        queue_timeout=st.none() | st.just(3.0),
        preemptible=st.booleans(),
        backoff=st.none() | st.sampled_from([0.0, 1.0]),
    )
    def submit(
        self,
        priority: int,
        gpu: bool,
        timeout: float | None,
        queue_timeout: float | None,
        preemptible: bool,
        backoff: float | None,
    ) -> None:
        task_id = next(self.task_ids)
        now = self.tick()
        task = Task(
            id=task_id,
            task="demo.sleep",
            args={},
            priority=priority,
            required_tags=("gpu",) if gpu else (),
            timeout=timeout,
            queue_timeout=queue_timeout,
            grace=GRACE,
            seq=int(task_id[1:]),
            create_time=now,
            preemptible=preemptible,
            retry=None if backoff is None else retry_policy(backoff),
        )
        if self.core.shutting_down:
            try:
                self.apply(TaskSubmitted(task, now))
            except ShuttingDown:
                return
            raise AssertionError("a submission during shutdown was accepted")
        self.apply(TaskSubmitted(task, now))

    @precondition(lambda self: bool(self.core.tasks))
    @rule(data=st.data(), cause=st.sampled_from(InterruptCause), unknown=st.integers(0, 9))
    def interrupt(self, data: st.DataObject, cause: InterruptCause, unknown: int) -> None:
        task_id = "nope" if unknown == 0 else data.draw(st.sampled_from(sorted(self.core.tasks)))
        task = self.core.tasks.get(task_id)
        revision = self.core.next_revision
        event = InterruptRequested(task_id, "alice", "stop", cause, self.tick())
        try:
            self.apply(event)
        except TaskNotFound:
            assert task is None
        except TaskAlreadyTerminal:
            assert task is not None and task.state in ALREADY_ENDED
            assert self.core.next_revision == revision, "a refused interrupt changed something"
        else:
            assert task is not None and task.state not in ALREADY_ENDED

    @rule(nonce=st.integers(0, 9))
    def shutdown(self, nonce: int) -> None:
        if nonce == 0:  # rare: a shutdown ends all dispatching for the rest of the run
            self.apply(ShutdownRequested(self.tick()))

    # ------------------------------------------------------------------ engines
    @rule(gpu=st.booleans(), ready=st.booleans())
    def engine_joins(self, gpu: bool, ready: bool) -> None:
        self.new_engine(GPU if gpu else frozenset(), ready=ready)

    @precondition(lambda self: bool(self.engines_in(EngineState.STARTING)))
    @rule(data=st.data())
    def engine_gets_ready(self, data: st.DataObject) -> None:
        engine_id = data.draw(st.sampled_from(self.engines_in(EngineState.STARTING)))
        self.apply(EngineReady(engine_id, "node", 100 + engine_id, GPU, self.tick()))

    @precondition(lambda self: bool(self.engines_in(*set(EngineState) - {EngineState.LOST})))
    @rule(data=st.data())
    def engine_dies(self, data: st.DataObject) -> None:
        alive = self.engines_in(*set(EngineState) - {EngineState.LOST})
        self.apply(EngineLost(data.draw(st.sampled_from(alive)), self.tick()))

    @precondition(lambda self: any(e.signals_in_flight for e in self.core.engines.values()))
    @rule(data=st.data())
    def nanny_acknowledges_a_signal(self, data: st.DataObject) -> None:
        pending = [e.id for e in self.core.engines.values() if e.signals_in_flight]
        self.apply(SignalDelivered(data.draw(st.sampled_from(pending)), self.tick()))

    @precondition(lambda self: bool(self.busy()))
    @rule(data=st.data(), chunk=st.sampled_from(["", "tok ", "a much longer chunk"]))
    def task_emits_output(self, data: st.DataObject, chunk: str) -> None:
        engine = self.core.engines[data.draw(st.sampled_from(self.busy()))]
        assert engine.current_task is not None
        self.apply(TaskOutput(engine.current_task, engine.current_attempt, chunk, self.tick()))

    @precondition(lambda self: bool(self.busy()))
    @rule(
        data=st.data(),
        status=st.sampled_from(OutcomeStatus),
        stage=st.sampled_from([EscalationStage.SIGINT, EscalationStage.SIGTERM]),
        reclaimed=st.booleans(),
        seconds=st.sampled_from([None, 0.001, 0.5]),
    )
    def task_finishes(
        self,
        data: st.DataObject,
        status: OutcomeStatus,
        stage: EscalationStage,
        reclaimed: bool,
        seconds: float | None,
    ) -> None:
        engine_id = data.draw(st.sampled_from(self.busy()))
        resources = {"reclaimed": reclaimed}
        outcome = Outcome(status, value=1, stage=stage, resources=resources, seconds=seconds)
        self.finish(engine_id, outcome)

    @precondition(lambda self: bool(self.busy()))
    @rule(data=st.data())
    def resource_limit_is_exceeded(self, data: st.DataObject) -> None:
        engine = self.core.engines[data.draw(st.sampled_from(self.busy()))]
        assert engine.current_task is not None
        event = ResourceLimitExceeded(
            engine.id, engine.current_task, engine.current_attempt, "rss", self.tick()
        )
        self.apply(event)

    @precondition(lambda self: self.requested_starts > 0)
    @rule()
    def requested_engine_arrives(self) -> None:
        self.new_engine(GPU, ready=True)

    @precondition(lambda self: bool(self.core.tasks))
    @rule(data=st.data(), status=st.sampled_from(OutcomeStatus))
    def stale_report_arrives(self, data: st.DataObject, status: OutcomeStatus) -> None:
        task = self.core.tasks[data.draw(st.sampled_from(sorted(self.core.tasks)))]
        before = task.state
        self.apply(TaskFinished(task.id, task.attempt + 1, Outcome(status), self.tick()))
        assert task.state is before

    # ------------------------------------------------------------------ timers
    @precondition(lambda self: bool(self.timers))
    @rule(data=st.data())
    def timer_fires(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(list(self.timers)))
        del self.timers[key]
        self.apply(TimerFired(key, self.tick()))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def engines_and_tasks_agree(self) -> None:
        core = self.core
        for engine in core.engines.values():
            assert engine.signals_in_flight >= 0
            if engine.current_task is None:
                assert engine.state is not EngineState.BUSY
                continue
            assert engine.state in (EngineState.BUSY, EngineState.STOPPING)
            task = core.tasks[engine.current_task]
            assert task.state.active
            assert (task.engine_id, task.attempt) == (engine.id, engine.current_attempt)
        active = [task for task in core.tasks.values() if task.state.active]
        on_engines = [e.current_task for e in core.engines.values() if e.current_task is not None]
        assert sorted(t.id for t in active) == sorted(on_engines)  # one engine per task, and back
        assert core.running_count == len(active)

    @invariant()
    def queue_holds_the_pending_tasks_but_those_waiting_out_a_backoff(self) -> None:
        pending = {t.id for t in self.core.tasks.values() if t.state is TaskState.PENDING}
        behind = [q.task_id for _engine, q in self.core._pool.queued()]
        assert len(set(behind)) == len(behind)  # one engine per queued task
        for engine in self.core.engines.values():
            depth = len(self.core._pool.queue_of(engine))
            if depth > 1:  # deeper than one only behind short tasks
                assert depth < self.PIPELINE_DEPTH
                assert engine.current_task is not None or engine.state is not EngineState.BUSY
        queued = set(self.core.queued_task_ids())
        assert not queued & set(behind)
        assert queued | set(behind) <= pending
        assert self.core.queue_length == len(queued) + len(behind)
        for task_id in pending - queued - set(behind):  # waiting out a retry's backoff
            task = self.core.tasks[task_id]
            assert task.attempts[-1].ending is AttemptEnding.RETRIED
            assert TimerKey(TimerKind.RETRY, task_id, task.attempt) in self.timers

    @invariant()
    def every_start_is_one_attempt_on_the_task(self) -> None:
        for task in self.core.tasks.values():
            numbers = [a.attempt for a in task.attempts]
            # A task withdrawn from behind a running one skips the number it was sent with.
            assert numbers == sorted(set(numbers)) and all(n <= task.attempt for n in numbers)
            open_attempts = [a for a in task.attempts if a.end_time is None]
            if task.state.active:
                assert open_attempts == [task.attempts[-1]]
                assert task.attempts[-1].attempt == task.attempt
                assert task.attempts[-1].engine_id == task.engine_id
            else:
                assert not open_attempts
            if task.retry is not None:
                failed = sum(a.ending is AttemptEnding.RETRIED for a in task.attempts)
                assert failed < task.retry.max_attempts

    @invariant()
    def tables_match_what_was_published(self) -> None:
        for task in self.core.tasks.values():
            assert task.state is self.history[task.id][-1]
            assert task.revision == self.last_publish[task.id]
        assert self.core.next_revision == self.last_revision + 1

    @invariant()
    def requested_starts_are_tracked(self) -> None:
        assert self.core.requested_engine_starts == self.requested_starts

    # ------------------------------------------------------------------ drain
    def teardown(self) -> None:
        if not self.broken:
            self.drain()

    def drain(self) -> None:
        """Let the world settle: acknowledge, arm and finish everything, fire every
        timer. Every task must end, except PENDING ones kept after a shutdown."""
        core = self.core
        for _ in range(100):
            for engine_id, task_id, attempt in list(self.withdrawals):
                del self.withdrawals[(engine_id, task_id, attempt)]
                self.apply(Withdrawn(engine_id, task_id, attempt, True, self.tick()))
            for engine in list(core.engines.values()):
                while engine.signals_in_flight:
                    self.apply(SignalDelivered(engine.id, self.tick()))
                if engine.state is EngineState.STOPPING:
                    self.apply(EngineLost(engine.id, self.tick()))
                elif engine.state is EngineState.STARTING:
                    self.apply(EngineReady(engine.id, "node", 1, GPU, self.tick()))
            while self.requested_starts:
                self.new_engine(GPU, ready=True)
            capable = [
                e
                for e in core.engines.values()
                if e.state in (EngineState.IDLE, EngineState.BUSY) and "gpu" in e.tags
            ]
            if core.queue_length and not core.shutting_down and not capable:
                self.new_engine(GPU, ready=True)
            for engine_id in self.busy():
                engine = core.engines[engine_id]
                assert engine.current_task is not None
                status = OutcomeStatus.SUCCEEDED
                if core.tasks[engine.current_task].state is TaskState.INTERRUPTING:
                    status = OutcomeStatus.INTERRUPTED
                outcome = Outcome(status, stage=EscalationStage.SIGINT, seconds=0.001)
                self.finish(engine_id, outcome)
            for key in [k for k in self.timers if k.kind is TimerKind.RETRY]:
                del self.timers[key]
                self.apply(TimerFired(key, self.tick()))
            behind = any(e.queued_task for e in core.engines.values())
            waiting = any(
                t.state is TaskState.PENDING
                and t.id not in core.queued_task_ids()
                and not any(e.queued_task == t.id for e in core.engines.values())
                for t in core.tasks.values()
            )
            if (
                not core.running_count
                and not behind
                and not waiting
                and (core.shutting_down or not core.queue_length)
            ):
                break
        for key in list(self.timers):
            del self.timers[key]
            self.apply(TimerFired(key, self.tick()))
        for task in core.tasks.values():
            assert task.state.terminal or (
                core.shutting_down and task.state is TaskState.PENDING
            ), f"{task.id} is still {task.state.name} after draining"


class PipelinedWorld(ControlCoreWorld):
    """The same world with pipelined dispatch: a task may wait queued behind a running one."""

    PIPELINE_DEPTH = 2

    def queued(self) -> list[int]:
        return [e.id for e in self.core.engines.values() if e.queued_task is not None]

    def queued_attempt(self, data: st.DataObject, engine_id: int) -> tuple[str, int]:
        """The first attempt queued on the engine (the one that can report)."""
        engine = self.core.engines[engine_id]
        assert engine.queued_task is not None
        return engine.queued_task, engine.queued_attempt

    @precondition(lambda self: bool(self.withdrawals))
    @rule(data=st.data(), withdrawn=st.booleans())
    def engine_answers_a_withdrawal(self, data: st.DataObject, withdrawn: bool) -> None:
        engine_id, task_id, attempt = data.draw(st.sampled_from(list(self.withdrawals)))
        del self.withdrawals[(engine_id, task_id, attempt)]
        self.apply(Withdrawn(engine_id, task_id, attempt, withdrawn, self.tick()))

    @precondition(lambda self: bool(self.queued()))
    @rule(data=st.data())
    def queued_task_reports_early(self, data: st.DataObject) -> None:
        task_id, attempt = self.queued_attempt(data, data.draw(st.sampled_from(self.queued())))
        kind = data.draw(st.sampled_from(["progress", "output", "not_started"]))
        if kind == "progress":
            self.apply(TaskProgressed(task_id, attempt, 0.5, "early", self.tick()))
        elif kind == "output":
            self.apply(TaskOutput(task_id, attempt, "early ", self.tick()))
        else:
            outcome = Outcome(OutcomeStatus.NOT_STARTED)
            self.apply(TaskFinished(task_id, attempt, outcome, self.tick()))


class DeeplyPipelinedWorld(PipelinedWorld):
    """Depth 4: short tasks (the runs that report 1 ms) may be queued three deep."""

    PIPELINE_DEPTH = 4

    def queued_attempt(self, data: st.DataObject, engine_id: int) -> tuple[str, int]:
        """Any attempt queued on the engine: the engine reports them in order, but the
        core must stay sound whichever arrives."""
        queue = self.core._pool.queue_of(self.core.engines[engine_id])
        queued = data.draw(st.sampled_from(queue))
        return queued.task_id, queued.attempt


for world in (ControlCoreWorld, PipelinedWorld, DeeplyPipelinedWorld):
    world.TestCase.settings = settings(
        max_examples=300,
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
test_control_core_under_random_events = ControlCoreWorld.TestCase
test_pipelined_core_under_random_events = PipelinedWorld.TestCase
test_deeply_pipelined_core_under_random_events = DeeplyPipelinedWorld.TestCase
