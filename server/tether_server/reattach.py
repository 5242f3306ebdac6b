"""Attached mode after a restart: find the old controller's work on the cluster, follow it.

A cluster started with ``ipcluster`` (any launcher) outlives tether. When tether starts
again on the same data dir, its store says which tasks were PENDING, RUNNING or
INTERRUPTING; the core holds them (``core/restore.py``) while this module asks the
cluster what became of them:

1. **The hub's records.** Every attempt tether sends carries a label
   (``cluster/hub_records.py``); the hub keeps it in its record of the request. Two
   queries find the old controller's attempts: the requests still pending (any of
   them may be ours: a running task, or one queued behind it by pipelined dispatch),
   and those of the live tasks' labels (they may have ended while nobody listened).
2. **The engines.** For each pending request, its engine is asked to withdraw it
   (``runtime.attempts``, on the control channel, answered while a task runs): an
   attempt that had not begun never will; one that had is running (or just ended).
3. **The replies.** The hub's record of an ended request holds the runtime's answer.

The answer goes to the core as one ``Reattached``; each attempt that still runs is then
followed: its IOPub reports reach the core as for any task (the IOPub channel is a
broadcast), and its reply, addressed to the old controller's client, is read from the
hub's record once it is there (polled every ``FOLLOW_INTERVAL`` seconds).

A hub without records (``NoDB``) or one that does not answer: the core is told why, and
the tasks that were on an engine end FAILED (CONTROLLER_RESTARTED) as in embedded mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .cluster import hub_records
from .cluster.hub_records import HubRecord
from .core import messages as msg
from .core.model import Task, TaskState
from .dispatch import outcome_of, outcome_of_error
from .runtime import attempts

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.5
"""Seconds between two looks at the hub's record of an adopted attempt's reply."""
LATER_ATTEMPTS = 3
"""Attempts above a PENDING task's stored one that the old controller may have sent
(a queued attempt is counted in memory only; each withdrawal and new queueing adds one)."""


class Reattacher:
    """Reconciles a restarted controller with an attached cluster, then follows what runs."""

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.cluster = controller.cluster

    async def reconcile(self) -> None:
        """Tell the core what became of the tasks it holds (one ``Reattached``)."""
        core = self.ctl.core_or_raise()
        if not core.reconciling:
            return
        tasks = core.unreconciled()
        generation = self.cluster.generation
        found: list[tuple[msg.FoundAttempt, str]] = []
        detail = ""
        if tasks:
            try:
                found = await asyncio.wait_for(self._find(tasks), timeout=60.0)
            except Exception as exc:
                log.warning("re-attach: the hub's records could not be read: %s", exc)
                detail = f"the hub's task records could not be read ({_why(exc)})"
        if self.cluster.generation != generation:
            found, detail = [], "the cluster was lost while tether re-attached to it"
        running = sum(1 for f, _ in found if f.began and f.outcome is None)
        log.info(
            "re-attached: %d live tasks; %d attempts found on the cluster, %d still running",
            len(tasks),
            len(found),
            running,
        )
        self.ctl.handle(msg.Reattached(tuple(f for f, _ in found), detail, time.time()))
        for f, msg_id in found:
            if f.began and f.outcome is None:
                self.ctl.spawn(self._follow(f, msg_id, generation))

    async def _find(self, tasks: list[Task]) -> list[tuple[msg.FoundAttempt, str]]:
        epoch = self.ctl.epoch
        live = {task.id: task for task in tasks}
        labels = []
        for task in tasks:
            if task.state is TaskState.PENDING:
                later = range(task.attempt + 1, task.attempt + 1 + LATER_ATTEMPTS)
                labels += [hub_records.label(epoch, task.id, n) for n in later]
            else:
                labels.append(hub_records.label(epoch, task.id, task.attempt))
        records: dict[str, tuple[HubRecord, int | None]] = {}
        for query in ({"completed": None}, {"label": {"$in": labels}}):
            for rec, engine_id in await self.cluster.hub_records(query):
                records[rec.msg_id] = (rec, engine_id)
        mine = []
        for rec, engine_id in records.values():
            key = hub_records.parse_label(rec.label, epoch)
            if key is not None and key[0] in live:
                mine.append((rec, engine_id, key))
        return list(await asyncio.gather(*(self._look_at(*m) for m in mine)))

    async def _look_at(
        self, rec: HubRecord, engine_id: int | None, key: tuple[str, int]
    ) -> tuple[msg.FoundAttempt, str]:
        """What became of one attempt: withdrawn, running, or ended (with its outcome)."""
        task_id, attempt = key
        engine = -1 if engine_id is None else engine_id
        if not rec.completed and engine_id is not None:
            content = {"task_id": task_id, "attempt": attempt}
            answer = await self.ctl.engines_driver.ask(
                engine_id, attempts.WITHDRAW_REQUEST, content
            )
            if answer is not None and answer.get("withdrawn"):
                return msg.FoundAttempt(task_id, attempt, engine, rec.submitted, False), rec.msg_id
            # Began, or no answer (a stuck engine): it runs, or it will.
        outcome: msg.Outcome | None = None
        if rec.completed:
            done, value = await self.cluster.hub_result(rec.msg_id)
            if done:
                outcome = _outcome(value)
                if outcome is None:  # its engine died under it
                    engine = -1
        found = msg.FoundAttempt(task_id, attempt, engine, rec.submitted, True, outcome)
        return found, rec.msg_id

    async def _follow(self, f: msg.FoundAttempt, msg_id: str, generation: int) -> None:
        """Wait for an adopted attempt's reply in the hub's records; hand it to the core."""
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            if self.cluster.generation != generation or self.ctl.shutting_down:
                return
            task = self.ctl.core_or_raise().tasks.get(f.task_id)
            if task is None or task.attempt != f.attempt or task.state.terminal:
                return  # it ended some other way (its engine was lost, ...)
            try:
                done, value = await self.cluster.hub_result(msg_id)
            except Exception as exc:
                # The record is gone (culled by the hub's record_limit) or the hub is
                # unreachable (supervision handles a lost hub): nothing more to wait for.
                if self.cluster.generation != generation:
                    return
                log.warning("re-attach: no reply of task %s in the hub: %s", f.task_id, exc)
                lost = msg.Outcome(
                    msg.OutcomeStatus.FAILED,
                    error_type="HubRecordLost",
                    error_message=f"the hub no longer has the record of its reply: {_why(exc)}",
                )
                self.ctl.handle(msg.TaskFinished(f.task_id, f.attempt, lost, time.time()))
                return
            if not done:
                continue
            if self.cluster.generation != generation:
                return
            outcome = _outcome(value)
            if outcome is None:
                self.ctl.handle(msg.EngineLost(f.engine_id, time.time()))
            else:
                self.ctl.handle(msg.TaskFinished(f.task_id, f.attempt, outcome, time.time()))
            return


def _outcome(value: Any) -> msg.Outcome | None:
    """The outcome of a reply read from the hub (None: the engine died)."""
    if isinstance(value, BaseException):
        return outcome_of_error(value)
    if isinstance(value, dict):
        return outcome_of(value)
    return msg.Outcome(
        msg.OutcomeStatus.FAILED,
        error_type="UnexpectedReply",
        error_message=f"the hub's record holds {type(value).__name__}, not a tether outcome",
    )


def _why(exc: BaseException) -> str:
    name = getattr(exc, "ename", "") or type(exc).__name__
    text = str(getattr(exc, "evalue", "") or exc)
    return f"{name}: {text}" if text else name
