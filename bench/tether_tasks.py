"""Bench-only tether task, loaded with ``tether-server --task-module bench.tether_tasks``.

``bench.stamped_count`` is ``demo.count`` whose output chunks carry the engine's wall
clock at ``ctx.emit``: B6 then times the whole progress path (engine -> controller ->
subscriber), not only the controller -> subscriber leg that ``event_time`` covers.
Engines import this module by reference: no import-time side effects.
"""

from __future__ import annotations

import time

from tether_server.runtime import TaskContext, task


@task("bench.stamped_count")
def stamped_count(ctx: TaskContext, n: int, interval: float = 0.01) -> int:
    """Emit ``n`` chunks ``"<seq> <time_ns>\\n"``, one per ``interval`` seconds."""
    for i in range(n):
        time.sleep(interval)
        ctx.emit(f"{i} {time.time_ns()}\n")
    return n
