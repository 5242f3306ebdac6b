"""Whether a task's ``required_tags`` can ever be met: tag feasibility, sans I/O.

A task waits PENDING until an idle engine carries all of its ``required_tags``
(``scheduling.choose_engine``). That wait is only worth it when some engine can carry
them: one that is there (any state but LOST), or one the server will start itself: each
of its engine *offers* (this host's engines, each remote slot) is the set of tags an
engine started there carries. In attached mode engines the server does not start may
still join, so nothing is refused at submit; a pending task that no engine can run is
reported *unschedulable* instead and ends by its queue timeout.
"""

from __future__ import annotations

from collections.abc import Iterable

from .model import Engine, EngineState, Task, TaskState

__all__ = ["feasible", "unschedulable"]


def feasible(
    required: Iterable[str], engines: Iterable[Engine], offers: Iterable[frozenset[str]]
) -> bool:
    """True when a live engine, or an engine of one of ``offers``, carries every tag."""
    needed = frozenset(required)
    if not needed:
        return True
    if any(e.state is not EngineState.LOST and needed <= e.tags for e in engines):
        return True
    return any(needed <= offer for offer in offers)


def unschedulable(tasks: Iterable[Task], engines: Iterable[Engine]) -> list[Task]:
    """PENDING tasks whose tags no engine that is there now (not LOST) carries."""
    live = [e for e in engines if e.state is not EngineState.LOST]
    return [
        t
        for t in tasks
        if t.state is TaskState.PENDING
        and t.required_tags
        and not any(frozenset(t.required_tags) <= e.tags for e in live)
    ]
