"""What a submission must pass, and what the server gives it, before it is recorded.

``Admission.check`` refuses what could never run (an unknown task name, arguments that do
not fit its signature, tags no engine this server starts would carry, a resume source
without a checkpoint), each with its own error; ``Admission.new_task`` fills in the
server's defaults (timeouts, graces, retry policy, preemptibility). The controller then
makes the record durable and queues it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .core import errors as err
from .core.model import GracePeriods, RetryPolicy, Task
from .core.placement import feasible
from .runtime import registry

if TYPE_CHECKING:
    from .controller import Controller


@dataclass(slots=True)
class SubmitSpec:
    """A validated SubmitTask request in domain terms."""

    task: str
    args: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    timeout: float | None = None
    queue_timeout: float | None = None
    grace: GracePeriods | None = None
    request_id: str = ""
    fingerprint: str = ""
    resume_from: str = ""
    required_tags: tuple[str, ...] = ()
    owner: str = "anonymous"
    retry: RetryPolicy | None = None
    """None: the server's default policy (``--retry-*``)."""
    preemptible: bool | None = None
    """None: preemptible when the task name is in ``--preemptible-tasks``."""


class Admission:
    """The submit-time checks and defaults of one controller."""

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.config = controller.config

    async def check(self, spec: SubmitSpec) -> None:
        """Refuse a task that could never run (nothing is recorded then)."""
        self._check_task_args(spec)
        self._check_schedulable(spec)
        if spec.resume_from:
            await self._check_resume_source(spec.resume_from)

    def new_task(self, spec: SubmitSpec, now: float, seq: int) -> Task:
        """The PENDING record of an admitted ``spec``, with the server's defaults."""
        return Task(
            id=uuid.uuid4().hex,
            task=spec.task,
            args=spec.args,
            owner=spec.owner,
            labels=dict(spec.labels),
            priority=spec.priority,
            create_time=now,
            update_time=now,
            timeout=spec.timeout if spec.timeout is not None else self._policy_timeout(spec),
            queue_timeout=self._queue_timeout(spec),
            grace=spec.grace or self.config.grace,
            resume_from=spec.resume_from,
            required_tags=tuple(spec.required_tags),
            retry=self._retry_policy(spec),
            preemptible=(
                spec.task in self.config.preemptible_tasks
                if spec.preemptible is None
                else spec.preemptible
            ),
            seq=seq,
        )

    # ------------------------------------------------------------------ checks
    def _check_task_args(self, spec: SubmitSpec) -> None:
        """The task name is registered and the arguments fit its signature."""
        try:
            registry.get(spec.task)
        except KeyError:
            raise err.InvalidRequest(
                "UNKNOWN_TASK",
                f"task: no task named {spec.task!r} is registered",
                violations=[
                    err.FieldViolation("task", f"no task named {spec.task!r} is registered")
                ],
                metadata={"field": "task"},
            ) from None
        try:
            registry.validate_args(spec.task, spec.args)
        except registry.ArgumentError as exc:
            raise err.InvalidRequest(
                exc.reason,
                f"args: {exc}",
                violations=[err.FieldViolation(v.field, v.description) for v in exc.violations],
                metadata={"field": "args", **exc.metadata},
            ) from None

    def _check_schedulable(self, spec: SubmitSpec) -> None:
        """Refuse a task no engine can ever run (embedded mode: every engine is ours)."""
        cluster = self.ctl.cluster
        if not spec.required_tags or not cluster.embedded:
            return
        offers = cluster.engine_offers(frozenset(self.config.engine_tags))
        if feasible(spec.required_tags, self.ctl.core_or_raise().engines.values(), offers):
            return
        known = sorted(set().union(*offers, *(e.tags for e in self.ctl.engines())))
        raise err.Unschedulable(
            f"no engine carries the tags {sorted(spec.required_tags)}, and none this server "
            f"starts would (engine tags: {known or 'none'})",
            metadata={
                "required_tags": ",".join(spec.required_tags),
                "engine_tags": ",".join(known),
            },
        )

    async def _check_resume_source(self, name: str) -> None:
        source_id = name.removeprefix("tasks/")
        source = await self.ctl.history.get(source_id)
        if source is None:
            raise err.TaskNotFound(f"task {name} does not exist", metadata={"name": name})
        if not source.has_checkpoint and await self.ctl.checkpoint_text(source_id) is None:
            raise err.CheckpointNotFound(
                f"task {name} has no checkpoint to resume from", metadata={"name": name}
            )

    # ------------------------------------------------------------------ defaults
    def _queue_timeout(self, spec: SubmitSpec) -> float | None:
        """The request's, else the server default; a task no engine can run yet (attached
        mode) gets the unschedulable default, so it never waits forever."""
        if spec.queue_timeout is not None:
            return spec.queue_timeout
        if self.config.default_queue_timeout_seconds is not None:
            return self.config.default_queue_timeout_seconds
        if spec.required_tags and not feasible(spec.required_tags, self.ctl.engines(), ()):
            return self.config.unschedulable_queue_timeout_seconds
        return None

    def _policy_timeout(self, spec: SubmitSpec) -> float | None:
        if spec.task == "llm.generate":
            p = self.config.llm_timeout
            tokens = float(spec.args.get("max_tokens", 64) or 0)
            prompt = len(str(spec.args.get("prompt", "")))
            return (
                p.base_seconds + p.per_token_seconds * tokens + p.per_prompt_char_seconds * prompt
            )
        return self.config.default_timeout_seconds

    def _retry_policy(self, spec: SubmitSpec) -> RetryPolicy | None:
        """The request's policy, else the server's; None when it retries nothing."""
        policy = spec.retry if spec.retry is not None else self.config.retry
        return policy if policy.max_attempts > 1 and policy.retry_on else None
