"""Several attempts in one request: ``run_tasks``, and the early reports that keep their
endings prompt.

Under load the controller sends an engine several short tasks in one apply request
(``dispatch.EngineDriver``): one request and one reply carry what would otherwise be
a request, a reply and a round of kernel bookkeeping per task, the larger part of a
short task's cost. The engine runs them in order, each exactly as :func:`.engine.run_task`
runs one (its own guard arming, withdrawal check, memory check and outcome), and the
reply lists every outcome in order: it is the reliable copy.

An outcome must not wait for the rest of its batch for long: a short task followed by
one that turns out long would otherwise end only when the long one does. So an
outcome that waited ``REPORT_AFTER`` seconds for the reply is published on IOPub at
once (kind ``"finished"``, the outcomes as the payload), by a helper thread that sleeps
while nothing waits. The controller takes whichever copy of an outcome comes first
and ignores the other. IOPub keeps each engine's messages in order, so a task's own
reports always come before its early ending.

What is lost with its engine: an outcome not yet reported when the engine dies (at
most ``REPORT_AFTER`` old) is not known to the controller, which then treats that task
as not begun (``core/pipeline.py``, losses). A task that must run at most once should
not run with ``--pipeline-depth`` above 2 (see docs/operations.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

from .context import MESSAGE_KEY, Sink
from .engine import _engine_publisher, run_task

__all__ = ["EARLY_KIND", "REPORT_AFTER", "EarlyReports", "run_tasks"]

REPORT_AFTER: Final = 0.01
"""Seconds an outcome waits for its batch's reply before it is published on its own."""
EARLY_KIND: Final = "finished"


def run_tasks(specs: list[dict[str, Any]], *, sink: Sink | None = None) -> list[dict[str, Any]]:
    """Run the attempts of ``specs`` in order (each as ``run_task``); their outcomes, in
    order, each with its ``task_id`` and ``attempt``. Never raises."""
    early = _reports(sink)
    outcomes: list[dict[str, Any]] = []
    try:
        for i, spec in enumerate(specs):
            outcome = run_task(spec, sink=sink)
            outcome["task_id"] = str(spec.get("task_id", ""))
            outcome["attempt"] = int(spec.get("attempt", 0))
            outcomes.append(outcome)
            if early is not None and i + 1 < len(specs):
                early.hold(outcome)
    finally:
        if early is not None:
            early.settle()  # the rest goes with the reply
    return outcomes


_EARLY: EarlyReports | None = None
_EARLY_LOCK = threading.Lock()


def _reports(sink: Sink | None) -> EarlyReports | None:
    """The engine's early reporter (a test's own for a ``sink``); None with no publisher."""
    global _EARLY
    if sink is not None:
        return EarlyReports(sink)
    with _EARLY_LOCK:
        if _EARLY is None:
            publish = _engine_publisher()
            if publish is None:
                return None
            _EARLY = EarlyReports(publish)
        return _EARLY


class EarlyReports:
    """Outcomes waiting for their batch's reply; those that waited ``after`` seconds are
    published at once. One per engine; the helper thread starts with the first batch."""

    def __init__(self, publish: Sink, after: float = REPORT_AFTER) -> None:
        self._publish = publish
        self._after = after
        self._cond = threading.Condition()
        self._waiting: list[dict[str, Any]] = []
        self._since = 0.0
        self._thread: threading.Thread | None = None
        self.published = 0
        """Outcomes published early (for tests and diagnostics)."""

    def hold(self, outcome: dict[str, Any]) -> None:
        """``outcome`` waits for the reply, ``after`` seconds at most."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tether-early-reports", daemon=True
                )
                self._thread.start()
            if not self._waiting:
                self._since = time.monotonic()
                self._cond.notify()
            self._waiting.append(outcome)

    def settle(self) -> None:
        """The reply goes now, with every outcome: none waits any more."""
        with self._cond:
            self._waiting.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                while self._waiting:
                    left = self._since + self._after - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                due, self._waiting = self._waiting, []
            if due:
                try:
                    self._publish({MESSAGE_KEY: [EARLY_KIND, "", 0, due]})
                    self.published += len(due)
                except Exception:  # the reply still carries them
                    pass
