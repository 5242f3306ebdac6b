"""The engine side of the controller: set engines up, run tasks on them, signal, kill.

Each coroutine here carries out one core instruction against the cluster
adapter and turns what comes back (a reply, an EngineError, a data message)
into a core event. Everything runs on the controller's loop. Runs belong to a
cluster *generation*: when the cluster is lost, :meth:`EngineDriver.cancel_runs`
ends the coroutines still waiting on the old hub, and no report of theirs
reaches the core afterwards (the new hub reuses engine ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from .cluster import EngineDied, IpyparallelCluster, hub_records
from .cluster.ipp import DIGEST_HISTORY, ENGINE_LOG_LEVEL, raise_error
from .core import messages as msg
from .core.model import EngineState, EscalationStage, Task
from .runtime import attempts, batch, registry

if TYPE_CHECKING:
    from .controller import Controller

log = logging.getLogger(__name__)

_STAGES = {"SIGINT": EscalationStage.SIGINT, "SIGTERM": EscalationStage.SIGTERM}


class EngineDriver:
    """Carries out Dispatch / SignalEngine / KillEngine / StartEngine for one controller."""

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.cluster: IpyparallelCluster = controller.cluster
        self.config = controller.config
        self._runs: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._received: dict[tuple[str, int], int] = {}
        self._message_waiters: dict[tuple[str, int], tuple[int, asyncio.Future[None]]] = {}
        self._outbox: dict[int, list[tuple[Task, int]]] = {}
        """Attempts to send at the next ``flush``, by engine."""
        self._holding = 0
        self._unreported: set[tuple[str, int]] = set()
        """Attempts sent in a batch whose outcome has not been reported yet."""
        self.max_batch = batch_size(self.config.pipeline_depth, attached=bool(self.config.attach))
        """Attempts one request carries at most."""
        self.requests_sent = 0
        """Requests sent to run tasks (``tether_task_requests_total``)."""
        self.attempts_sent = 0
        """Attempts those carried (``tether_task_request_attempts_total``)."""

    # ------------------------------------------------------------------ engines
    def task_modules(self) -> list[str]:
        """Demo tasks always; LLM tasks when torch is installed (the [llm] extra); then the operator's."""
        import importlib.util

        modules = ["tether_server.tasks.demo"]
        if importlib.util.find_spec("torch") is not None:
            modules.append("tether_server.tasks.llm")
        return [*modules, *self.config.task_modules]

    async def setup_engine(self, engine_id: int) -> None:
        generation = self.cluster.generation
        modules = self.task_modules()
        config = {
            "task_modules": modules,
            "tags": list(self.config.engine_tags),
            "task_settings": registry.settings(),  # e.g. the --model checkpoints
            "digest_history": DIGEST_HISTORY,
            # Engines tether started log what it asked for; an operator's keep theirs.
            "log_level": None if self.config.attach else ENGINE_LOG_LEVEL,
            # The engine's own load reports and memory-limit checks (runtime/monitor.py).
            "engine_id": engine_id,
            "load_interval": self.config.load_interval_seconds,
            "memory_limit_bytes": self.config.memory_limit_bytes,
            # LLM engines import torch and the model code at start, not in their first task.
            "preload_modules": ["tether_server.tasks.llm_model:warm_up"]
            if "tether_server.tasks.llm" in modules and self.config.warm_up
            else [],
        }
        try:
            info = await self.cluster.setup_engine(engine_id, config)
        except EngineDied:
            if self.cluster.generation == generation:
                self.ctl.handle(msg.EngineLost(engine_id, time.time()))
            return
        except Exception:
            if self.cluster.generation != generation:
                return
            # An engine that cannot run the runtime would sit STARTING forever and shrink
            # the pool. Embedded: kill it; its loss brings a replacement. Attached: the
            # engine may be busy with work of a previous controller (setup queues behind
            # it), and it is not ours to kill; it stays STARTING and the pool degraded.
            if self.cluster.embedded:
                log.exception("engine %s could not be set up; killing it", engine_id)
                await self.kill(engine_id, "setup failed")
            else:
                log.exception("engine %s could not be set up; trying again in 30 s", engine_id)
                self.ctl.spawn(self._setup_engine_later(engine_id, 30.0, generation))
            return
        if self.cluster.generation != generation:
            return
        host, pid = str(info.get("host", "")), int(info.get("pid", 0))
        self.cluster.note_engine_placement(engine_id, info)
        self.ctl.supervisor.track(engine_id, host, pid, local=self.cluster.is_local(info))
        self.ctl.handle(
            msg.EngineReady(
                engine_id, host=host, pid=pid, tags=frozenset(info.get("tags", ())), now=time.time()
            )
        )
        self.ctl.ready.set()

    async def _setup_engine_later(self, engine_id: int, delay: float, generation: int) -> None:
        await asyncio.sleep(delay)
        engine = self.ctl.core_or_raise().engines.get(engine_id)
        if (
            engine is not None
            and engine.state is EngineState.STARTING
            and self.cluster.generation == generation
            and not self.ctl.shutting_down
        ):
            await self.setup_engine(engine_id)

    async def start_engine(self, replaces: int | None) -> None:
        if not self.cluster.embedded or self.ctl.shutting_down:
            log.warning("engine %s lost; attached mode cannot replace it (pool degraded)", replaces)
            return
        try:
            await self.cluster.replace_engine(replaces)  # on the lost engine's host
        except Exception:
            log.exception("could not start a replacement engine")
            self.ctl.handle(msg.EngineStartFailed(time.time()))

    # ------------------------------------------------------------------ tasks
    def dispatch(self, task_id: str, attempt: int, engine_id: int) -> None:
        """Send (task_id, attempt) to its engine: at the next ``flush`` when it needs no
        checkpoint (with whatever else goes to that engine then), else once it is read."""
        task = self.ctl.core_or_raise().tasks[task_id]
        if attempt == 1 and not task.resume_from:
            self._outbox.setdefault(engine_id, []).append((task, attempt))
            return
        self._track([(task_id, attempt)], self._run_task(task_id, attempt, engine_id))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Dispatches made inside wait for its end, so that those to one engine leave in
        as few requests as ``max_batch`` allows (the endings of one reply free several
        places at once)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            self.flush()

    def flush(self) -> None:
        """Send what ``dispatch`` collected, one request per engine (``max_batch`` tasks
        at most each); nothing while ``holding``."""
        if self._holding or not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for engine_id, entries in outbox.items():
            for i in range(0, len(entries), self.max_batch):
                chunk = entries[i : i + self.max_batch]
                keys = [(task.id, attempt) for task, attempt in chunk]
                self.requests_sent += 1
                self.attempts_sent += len(chunk)
                if len(chunk) == 1:
                    sent = self._send(chunk[0][0], chunk[0][1], engine_id, None)
                else:
                    specs = [self._spec(task, attempt, None) for task, attempt in chunk]
                    label = hub_records.label(self.ctl.epoch, *keys[0])
                    sent = self.cluster.send_tasks(engine_id, specs, label)
                generation = self.cluster.generation
                report = self._report(keys, engine_id, sent, generation, batched=len(chunk) > 1)
                self._track(keys, report)

    def _track(self, keys: list[tuple[str, int]], work: Coroutine[Any, Any, None]) -> None:
        run = asyncio.ensure_future(work)
        for key in keys:
            self._runs[key] = run

        def done(_fut: asyncio.Future[Any]) -> None:
            for key in keys:
                if self._runs.get(key) is run:
                    del self._runs[key]

        run.add_done_callback(done)
        run.add_done_callback(log_failure)

    def cancel_runs(self) -> None:
        """The cluster is lost: stop waiting for replies that will never come."""
        for run in list(self._runs.values()):
            run.cancel()
        self._runs.clear()
        self._received.clear()
        self._unreported.clear()
        self._outbox.clear()
        for _expected, fut in self._message_waiters.values():
            if not fut.done():
                fut.cancel()
        self._message_waiters.clear()

    async def _report(
        self,
        keys: list[tuple[str, int]],
        engine_id: int,
        sent: asyncio.Future[Any],
        generation: int,
        *,
        batched: bool,
    ) -> None:
        """Report the outcomes of one request, in order: one attempt's (``run_task``), or
        several (``runtime.batch.run_tasks``), each skipped if it came early on IOPub
        (``on_task_message``)."""
        self._unreported.update(keys)
        try:
            try:
                raw = raise_error(await sent)
            except Exception as exc:
                if self.cluster.generation != generation:
                    return
                outcome = outcome_of_error(exc)
                with self.holding():
                    if outcome is None:
                        self.ctl.handle(msg.EngineLost(engine_id, time.time()))
                    else:
                        for key in keys:
                            self._conclude(key, outcome)
                return
            outcomes = [(batch_key(o), o) for o in raw] if batched else [(keys[0], raw)]
            # The reply and the IOPub messages travel on different sockets: wait (briefly)
            # for each task's last progress/output messages so none lands after its end.
            for key, o in outcomes:
                if key in self._unreported:
                    await self._messages_seen(key, int(o.get("published", 0) or 0))
            if self.cluster.generation != generation:
                return
            with self.holding():
                for key, o in outcomes:
                    self._conclude(key, outcome_of(o))
        finally:
            self._unreported.difference_update(keys)
            for key in keys:
                self._received.pop(key, None)

    def _conclude(self, key: tuple[str, int], outcome: msg.Outcome) -> None:
        """One outcome of a batch, the first of its two copies (the reply, the early one)."""
        if key in self._unreported:
            self._unreported.discard(key)
            self.ctl.handle(msg.TaskFinished(key[0], key[1], outcome, time.time()))

    async def _run_task(self, task_id: str, attempt: int, engine_id: int) -> None:
        """Read the checkpoint the attempt resumes from, send it, report its outcome."""
        generation = self.cluster.generation
        task = self.ctl.core_or_raise().tasks[task_id]
        # A later attempt resumes from the task's own last checkpoint (retry,
        # preemption); else, or before the task saved one, from the task it was
        # told to resume from.
        text = await self.ctl.checkpoint_text(task_id) if attempt > 1 else None
        if text is None and task.resume_from:
            text = await self.ctl.checkpoint_text(task.resume_from.removeprefix("tasks/"))
        sent = self._send(task, attempt, engine_id, json.loads(text) if text else None)
        self.requests_sent += 1
        self.attempts_sent += 1
        await self._report([(task_id, attempt)], engine_id, sent, generation, batched=False)

    def _send(
        self, task: Task, attempt: int, engine_id: int, resume_state: Any
    ) -> asyncio.Future[Any]:
        """Send the attempt to its engine; the future of its outcome (``send_task``)."""
        spec = self._spec(task, attempt, resume_state)
        label = hub_records.label(self.ctl.epoch, task.id, attempt)
        return self.cluster.send_task(engine_id, spec, label)

    def _spec(self, task: Task, attempt: int, resume_state: Any) -> dict[str, Any]:
        """What the runtime's ``run_task`` gets for the attempt."""
        return {
            "task_id": task.id,
            "attempt": attempt,
            "task": task.task,
            "args": task.args,
            "resume_state": resume_state,
            "max_output_chars": self.config.limits.max_output_chars,
            "rss_tolerance_bytes": self.config.rss_tolerance_bytes,
            "gpu_tolerance_bytes": self.config.gpu_tolerance_bytes,
            "drain_if_not_reclaimed": True,
        }

    async def _messages_seen(self, key: tuple[str, int], expected: int) -> None:
        if self._received.get(key, 0) >= expected:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._message_waiters[key] = (expected, fut)
        try:
            await asyncio.wait_for(fut, timeout=0.5)
        except TimeoutError:
            log.warning(
                "task %s attempt %s: %d of %d messages arrived before its result",
                key[0],
                key[1],
                self._received.get(key, 0),
                expected,
            )
        finally:
            self._message_waiters.pop(key, None)

    def on_task_message(self, task_id: str, attempt: int, kind: str, payload: Any) -> None:
        if kind == batch.EARLY_KIND:  # outcomes of a batch, ahead of its reply
            with self.holding():
                for o in payload if isinstance(payload, list) else ():
                    self._conclude(batch_key(o), outcome_of(o))
            return
        if kind != "load":  # a task's own reports (see _messages_seen)
            key = (task_id, attempt)
            count = self._received[key] = self._received.get(key, 0) + 1
            waiter = self._message_waiters.get(key)
            if waiter is not None and count >= waiter[0] and not waiter[1].done():
                waiter[1].set_result(None)
        now = time.time()
        if kind == "progress":
            fraction, message = payload
            self.ctl.handle(
                msg.TaskProgressed(task_id, attempt, float(fraction), str(message), now)
            )
        elif kind == "output":
            self.ctl.handle(msg.TaskOutput(task_id, attempt, str(payload), now))
        elif kind == "checkpoint":
            task = self.ctl.core_or_raise().tasks.get(task_id)
            if task is not None and task.attempt != attempt:
                return  # a late checkpoint of an earlier attempt must not replace a newer one
            self.ctl.save_checkpoint(task_id, json.dumps(payload))
            self.ctl.handle(msg.TaskCheckpointed(task_id, attempt, now))
        elif kind == "load":  # an engine's own load report (runtime/monitor.py)
            self.ctl.loads.report(payload, now)

    # ------------------------------------------------------------------ signals
    async def signal(self, engine_id: int, sig: str, task_id: str, attempt: int) -> None:
        """SIGINT / SIGTERM for exactly (task_id, attempt): the engine raises it only in
        that attempt, at once if it runs, when it begins if it has not yet
        (``runtime.attempts``), so a signal never lands in the attempt queued behind it."""
        generation = self.cluster.generation
        content = {"task_id": task_id, "attempt": attempt, "signal": sig}
        answer = await self.ask(engine_id, attempts.SIGNAL_REQUEST, content)
        if answer is not None and not (answer.get("delivered") or answer.get("held")):
            log.info("%s for task %s attempt %s: it had ended", sig, task_id, attempt)
        if self.cluster.generation == generation:
            self.ctl.handle(msg.SignalDelivered(engine_id, time.time()))

    async def withdraw(self, engine_id: int, task_id: str, attempt: int) -> None:
        """Ask the engine not to start its queued (task_id, attempt); report its answer.

        No answer (the engine is stuck or gone) counts as "it began": the task then
        runs after the current one, or ends with its engine.
        """
        generation = self.cluster.generation
        content = {"task_id": task_id, "attempt": attempt}
        answer = await self.ask(engine_id, attempts.WITHDRAW_REQUEST, content)
        withdrawn = bool(answer and answer.get("withdrawn"))
        if self.cluster.generation == generation:
            self.ctl.handle(msg.Withdrawn(engine_id, task_id, attempt, withdrawn, time.time()))

    async def ask(
        self, engine_id: int, msg_type: str, content: dict[str, Any]
    ) -> dict[str, Any] | None:
        """One control-channel request to the engine's runtime; None (logged) without an answer."""
        try:
            return await asyncio.wait_for(
                self.cluster.control_request(engine_id, msg_type, content), timeout=5.0
            )
        except Exception as exc:
            log.info("%s %s to engine %s failed: %s", msg_type, content, engine_id, exc)
            return None

    async def kill(self, engine_id: int, reason: str) -> None:
        """SIGKILL an engine, and the processes its task started.

        A SIGKILLed engine cannot clean up after itself, so its descendants (but
        not its nanny, which must report the death to the hub) are listed first
        and killed right after it. The supervisor finishes the job on its next
        tick (nanny included) if anything survived.
        """
        log.info("killing engine %s: %s", engine_id, reason)
        orphans = self.ctl.supervisor.task_children(engine_id)
        local_pid = self.ctl.supervisor.local_pid(engine_id)
        try:
            await asyncio.wait_for(self.cluster.signal(engine_id, "SIGKILL"), timeout=2.0)
        except Exception:
            # The nanny is gone or slow: kill the process directly when it is local.
            if local_pid:
                with contextlib.suppress(OSError):
                    os.kill(local_pid, signal.SIGKILL)
        for proc in orphans:
            with contextlib.suppress(Exception):
                proc.kill()

    # ------------------------------------------------------------------ resource policy
    async def resource_policy_loop(self) -> None:
        import psutil

        limit = self.config.memory_limit_bytes
        while not self.ctl.shutting_down:
            await asyncio.sleep(0.25)
            core = self.ctl.core_or_raise()
            for engine in list(core.engines.values()):
                # This host's engines only; remote ones measure themselves (loads.py).
                pid = self.ctl.supervisor.local_pid(engine.id)
                if engine.state is not EngineState.BUSY or not pid or engine.current_task is None:
                    continue
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                if rss > limit:
                    self.ctl.handle(
                        msg.ResourceLimitExceeded(
                            engine.id,
                            engine.current_task,
                            engine.current_attempt,
                            f"engine RSS {rss} bytes over the limit of {limit} bytes",
                            time.time(),
                        )
                    )


def log_failure(fut: asyncio.Future[Any]) -> None:
    """Done-callback of background work: log what it raised (nobody awaits it)."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background task failed", exc_info=fut.exception())


def batch_size(pipeline_depth: int, *, attached: bool) -> int:
    """Attempts one request may carry: half the depth, so that an engine holds two
    requests and never idles for a round trip between them. One when attached: a
    restarted controller finds attempts by their request's label (``reattach``)."""
    return 1 if attached else max(1, pipeline_depth // 2)


def batch_key(outcome: Any) -> tuple[str, int]:
    """(task_id, attempt) of one outcome of ``runtime.batch.run_tasks``."""
    return str(outcome.get("task_id", "")), int(outcome.get("attempt", 0) or 0)


def outcome_of_error(exc: BaseException) -> msg.Outcome | None:
    """What a failed apply means: None when the engine died, else the task FAILED."""
    if isinstance(IpyparallelCluster.unwrap_error(exc), EngineDied):
        return None
    return msg.Outcome(
        msg.OutcomeStatus.FAILED,
        error_type=getattr(exc, "ename", type(exc).__name__),
        error_message=str(getattr(exc, "evalue", exc)),
        traceback="".join(getattr(exc, "traceback", "") or ""),
    )


def outcome_of(raw: dict[str, Any]) -> msg.Outcome:
    """The runtime's ``run_task`` answer as a core ``Outcome``."""
    status = msg.OutcomeStatus(raw.get("status", "failed"))
    return msg.Outcome(
        status=status,
        value=raw.get("value"),
        error_type=str(raw.get("error_type", "")),
        error_message=str(raw.get("error_message", "")),
        traceback=str(raw.get("traceback", "")),
        stage=_STAGES.get(str(raw.get("stage", "")), EscalationStage.NONE),
        output=raw.get("output"),
        output_truncated=bool(raw.get("output_truncated", False)),
        resources=raw.get("resources"),
        seconds=_seconds(raw.get("seconds")),
    )


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
