"""How task records may change: the legal transitions, snapshots, bounded output.

Small rules that ``ControlCore`` applies on every change, kept apart so that the
state machine reads as the contract and these read as the guard rails.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from .model import TERMINAL_STATES, AttemptEnding, ResourceReport, Task, TaskError, TaskState

_S = TaskState
LEGAL_TRANSITIONS: Mapping[TaskState, frozenset[TaskState]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.CANCELLED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.INTERRUPTING, _S.SUCCEEDED, _S.FAILED, _S.PENDING}),
    _S.INTERRUPTING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.INTERRUPTED, _S.TIMED_OUT, _S.PENDING}),
    **{state: frozenset() for state in TERMINAL_STATES},
}
"""Every state a task may move to from each state. Terminal states have no exit.

RUNNING never goes straight to INTERRUPTED or TIMED_OUT: those mean "stopped
because someone asked", and asking always passes through INTERRUPTING. An active
task goes back to PENDING when its attempt is retried or preempted (a new attempt
follows; see ``core/retry.py`` and ``core/preemption.py``).
"""


class InvariantViolation(AssertionError):
    """The core was about to break one of its own invariants: a bug in the core,
    never a bad request. Raised instead of silently corrupting the tables."""


def move(task: Task, state: TaskState) -> None:
    """Set ``task.state``, refusing any edge ``LEGAL_TRANSITIONS`` does not list."""
    if state not in LEGAL_TRANSITIONS[task.state]:
        raise InvariantViolation(f"task {task.id}: {task.state.name} -> {state.name}")
    task.state = state


def close_attempt(task: Task, ending: AttemptEnding, error: TaskError | None, now: float) -> None:
    """Record how the task's current attempt ended (nothing when none is open)."""
    if not task.attempts or task.attempts[-1].end_time is not None:
        return
    attempt = task.attempts[-1]
    attempt.end_time = now
    attempt.ending = ending
    if error is not None:
        attempt.reason, attempt.message = error.reason.value, error.message
    if ending is AttemptEnding.PREEMPTED and task.interrupt is not None:
        attempt.ended_by = task.interrupt.requested_by


def snapshot(task: Task, *, keep_output: bool) -> Task:
    """A copy of ``task`` that later changes to the task cannot alter.

    ``args`` and ``result`` are shared: nothing changes them after submit and
    finish. The output is left out unless ``keep_output``: OUTPUT events carry
    their chunk, and repeating the whole text in every event would make the log
    quadratic in the size of the output.
    """
    copied = copy.copy(task)
    copied.labels = dict(task.labels)
    copied.interrupt = copy.copy(task.interrupt)
    copied.error = copy.copy(task.error)
    copied.resources = copy.copy(task.resources)
    copied.attempts = [copy.copy(attempt) for attempt in task.attempts]
    if not keep_output:
        copied.output = ""
    return copied


def bounded(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to ``limit`` characters, and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[:limit], True


_RESOURCE_FIELDS = frozenset(f.name for f in dataclasses.fields(ResourceReport)) - {
    "engine_recycled"  # the controller's decision, never the engine's
}


def resource_report(fields: Mapping[str, Any]) -> ResourceReport:
    """A ResourceReport from what the runtime measured, ignoring keys it does not know
    (a newer runtime may measure more than this controller understands)."""
    known = {name: value for name, value in fields.items() if name in _RESOURCE_FIELDS}
    return ResourceReport(**known)


def seconds(value: float | None) -> str:
    """A duration for human-readable messages: ``2.5s``."""
    return "an unset limit" if value is None else f"{value:g}s"
