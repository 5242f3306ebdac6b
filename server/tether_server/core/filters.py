"""Which tasks a listing or a stream covers (``tether.v1.TaskFilter``).

Empty fields match everything; set fields must all match: the state is one of
``states``, the registered task name is one of ``tasks``, every label in
``labels`` is on the task with that value, and the task's id is one of ``ids``.

A filter on ``ids`` is exact for streams: a task's id never changes, so such a
stream sees every event of those tasks, whatever their state (a filter on
states matches each event's snapshot and loses a task once it leaves them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from .model import Task, TaskState


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """A task filter. Immutable: ``labels`` is copied on construction."""

    states: frozenset[TaskState] = frozenset()
    tasks: frozenset[str] = frozenset()
    """Registered task names (``"demo.sleep"``), not task ids."""
    labels: dict[str, str] = field(default_factory=dict)
    ids: frozenset[str] = frozenset()
    """Task ids (the ``{id}`` of ``tasks/{id}``): the contract's ``TaskFilter.names``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", frozenset(self.states))
        object.__setattr__(self, "tasks", frozenset(self.tasks))
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "ids", frozenset(self.ids))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every task."""
        return not (self.states or self.tasks or self.labels or self.ids)

    def matches(self, task: Task) -> bool:
        return (
            (not self.ids or task.id in self.ids)
            and (not self.states or task.state in self.states)
            and (not self.tasks or task.task in self.tasks)
            and all(task.labels.get(key) == value for key, value in self.labels.items())
        )

    def fingerprint(self) -> str:
        """A short digest that is equal exactly for equal filters, in every process.

        Page tokens carry it so that paging on with a different filter is refused.
        Built from a canonical JSON text (sorted names), not from ``hash()``,
        which is salted per process. ``ids`` joins the text only when set, so the
        fingerprints of filters without it (page tokens already handed out) stay.
        """
        fields: dict[str, object] = {
            "v": 1,
            "states": sorted(state.name for state in self.states),
            "tasks": sorted(self.tasks),
            "labels": sorted(self.labels.items()),
        }
        if self.ids:
            fields["ids"] = sorted(self.ids)
        canonical = json.dumps(fields, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]
