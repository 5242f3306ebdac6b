"""Which tasks a listing or a stream covers (``tether.v1.TaskFilter``).

Empty fields match everything; set fields must all match: the state is one of
``states``, the registered task name is one of ``tasks``, and every label in
``labels`` is on the task with that value.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", frozenset(self.states))
        object.__setattr__(self, "tasks", frozenset(self.tasks))
        object.__setattr__(self, "labels", dict(self.labels))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    @property
    def is_empty(self) -> bool:
        """True when the filter matches every task."""
        return not (self.states or self.tasks or self.labels)

    def matches(self, task: Task) -> bool:
        return (
            (not self.states or task.state in self.states)
            and (not self.tasks or task.task in self.tasks)
            and all(task.labels.get(key) == value for key, value in self.labels.items())
        )

    def fingerprint(self) -> str:
        """A short digest that is equal exactly for equal filters, in every process.

        Page tokens carry it so that paging on with a different filter is refused.
        Built from a canonical JSON text (sorted names), not from ``hash()``,
        which is salted per process.
        """
        canonical = json.dumps(
            {
                "v": 1,
                "states": sorted(state.name for state in self.states),
                "tasks": sorted(self.tasks),
                "labels": sorted(self.labels.items()),
            },
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]
