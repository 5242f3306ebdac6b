"""Preemption policy: which running task gives its engine to an urgent one.

When a PENDING task finds no free engine with the tags it needs, the control
core asks :func:`choose_victim` for a RUNNING task to stop (DESIGN §16). The
victim is interrupted with cause PREEMPTED through the usual ladder (SIGINT
first, so it checkpoints), queued again with attempt + 1, and resumes from its
checkpoint later; the urgent task takes the engine it frees. The rules:

* only tasks submitted as ``preemptible``, only RUNNING ones (an INTERRUPTING task
  is already leaving; a task queued on an engine behind a running one is not
  running yet), only of a strictly lower priority than the urgent task;
* the victim's engine must carry every tag the urgent task requires, and be an
  active engine (not a spare);
* among those: the lowest priority first, then the most recently started attempt
  (it has done the least work since its checkpoint), then the lowest engine id;
* a task that was preempted before must run ``min_runtime`` seconds in its
  current attempt before it can be preempted again, so two tasks cannot take an
  engine from each other in a loop;
* one urgent task preempts at most one task at a time: the core keeps a
  :class:`Preemption` per urgent task while its engine is being freed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from .model import AttemptEnding, Engine, EngineState, Task, TaskState


@dataclass(frozen=True, slots=True)
class Preemption:
    """An engine being freed for one urgent task: (victim, attempt) on ``engine_id``."""

    victim_id: str
    attempt: int
    engine_id: int

    def still_freeing(self, engine: Engine | None) -> bool:
        """Whether the engine is still on its way to the urgent task: the victim is
        still on it, or it is free and waiting (a signal in flight). Once it runs
        anything else, or is lost, the urgent task may preempt again."""
        if engine is None or engine.state is EngineState.LOST:
            return False
        return engine.current_task is None or (engine.current_task, engine.current_attempt) == (
            self.victim_id,
            self.attempt,
        )


@dataclass(slots=True)
class Plan:
    """What :func:`plan_preemptions` decided."""

    preemptions: list[tuple[Task, Task, Engine]] = field(default_factory=list)
    """(urgent, victim, victim's engine), in queue order."""
    look_again_at: float | None = None
    """The earliest time a victim now too young (minimum run time) becomes eligible."""


def plan_preemptions(
    queue: Iterable[str],
    tasks: Mapping[str, Task],
    engines: Iterable[Engine],
    *,
    served: Collection[str],
    now: float,
    min_runtime: float,
    queued_behind: Iterable[tuple[Task, Engine]] = (),
) -> Plan:
    """Which queued tasks preempt which running ones now.

    ``queue`` is the pending queue in dispatch order (highest priority first), after
    the dispatch pass placed what it could; ``served`` are urgent tasks that already
    have an engine being freed for them. The scan stops at the lowest running
    preemptible priority (nothing at or below it can preempt anyone), so a long queue
    of equal priorities costs nothing. Each victim is taken once.

    ``queued_behind`` are tasks queued on an engine behind its running task
    (pipelined dispatch): such a task preempts the task in front of it when that one
    is a victim it may take (it already fits that engine).
    """
    running = [
        (task, engine)
        for engine in engines
        if engine.current_task is not None
        and (task := tasks.get(engine.current_task)) is not None
        and task.preemptible
        and task.state is TaskState.RUNNING
        and task.attempt == engine.current_attempt
    ]
    plan = Plan()
    if not running:
        return plan

    def consider(urgent: Task, candidates: list[tuple[Task, Engine]]) -> None:
        choice = choose_victim(urgent, candidates, now=now, min_runtime=min_runtime)
        if isinstance(choice, float):
            if plan.look_again_at is None or choice < plan.look_again_at:
                plan.look_again_at = choice
        elif choice is not None:
            running.remove(choice)
            plan.preemptions.append((urgent, *choice))

    for urgent, engine in queued_behind:
        front = [(task, e) for task, e in running if e is engine]
        if urgent.id not in served and front:
            consider(urgent, front)
    if not running:
        return plan
    floor = min(task.priority for task, _ in running)
    for task_id in queue:
        urgent = tasks[task_id]
        if urgent.priority <= floor or not running:
            break
        if task_id not in served:
            consider(urgent, running)
    return plan


def was_preempted(task: Task) -> bool:
    """Whether an earlier attempt of ``task`` ended by preemption."""
    return any(a.ending is AttemptEnding.PREEMPTED for a in task.attempts)


def eligible_at(task: Task, min_runtime: float) -> float:
    """The earliest time ``task`` (RUNNING) may be preempted."""
    if not was_preempted(task) or task.start_time is None:
        return float("-inf")
    return task.start_time + min_runtime


def choose_victim(
    urgent: Task,
    running: Iterable[tuple[Task, Engine]],
    *,
    now: float,
    min_runtime: float,
) -> tuple[Task, Engine] | float | None:
    """The (task, engine) ``urgent`` should preempt now.

    Returns a time instead when a victim would exist but must first reach its
    minimum run time (the earliest such time, so the caller can look again then),
    and None when no running task can ever free an engine for ``urgent``.
    """
    needed = frozenset(urgent.required_tags)
    best: tuple[Task, Engine] | None = None
    best_key: tuple[int, float, int] | None = None
    wait_until: float | None = None
    for task, engine in running:
        if (
            not task.preemptible
            or task.state is not TaskState.RUNNING
            or task.priority >= urgent.priority
            or engine.spare
            or not needed <= engine.tags
        ):
            continue
        ready_at = eligible_at(task, min_runtime)
        if ready_at > now:
            wait_until = ready_at if wait_until is None else min(wait_until, ready_at)
            continue
        started = task.start_time if task.start_time is not None else 0.0
        key = (task.priority, -started, engine.id)
        if best_key is None or key < best_key:
            best, best_key = (task, engine), key
    if best is not None:
        return best
    return wait_until
