"""Request validation. Every problem becomes an InvalidRequest with one field
violation per wrong field, so a caller learns everything wrong in one round trip."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import duration_pb2

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from ..config import Limits
from ..core.errors import FieldViolation, InvalidRequest
from ..core.model import ErrorReason, GracePeriods, RetryPolicy, TaskState
from ..core.retry import DEFAULT_RETRY_ON, validate_policy

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?$")
MAX_FILTER_NAMES = 1_000
"""Most task names one ``TaskFilter.names`` may hold (a client watching more splits them)."""


class Violations:
    """Collects field violations, then raises one InvalidRequest naming the first reason."""

    def __init__(self) -> None:
        self.items: list[tuple[str, FieldViolation]] = []

    def add(self, reason: str, field: str, description: str) -> None:
        self.items.append((reason, FieldViolation(field, description)))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        reason = self.items[0][0]
        message = "; ".join(f"{v.field}: {v.description}" for _, v in self.items)
        raise InvalidRequest(
            reason,
            message,
            violations=[v for _, v in self.items],
            metadata={"field": self.items[0][1].field},
        )


def parse_task_name(name: str, field: str = "name") -> str:
    """'tasks/{id}' -> id, or INVALID_NAME / MISSING_FIELD."""
    v = Violations()
    if not name:
        v.add("MISSING_FIELD", field, "required: a task name like tasks/{id}")
    elif not is_task_name(name):
        v.add("INVALID_NAME", field, f"{name!r} is not a task name like tasks/{{id}}")
    v.raise_if_any()
    return name[6:]


def is_task_name(name: str) -> bool:
    """Whether ``name`` has the shape ``tasks/{id}``."""
    return name.startswith("tasks/") and _ID.match(name[6:]) is not None


def check_duration(
    v: Violations,
    d: duration_pb2.Duration,
    field: str,
    reason: str,
    maximum: float,
    *,
    allow_zero: bool = False,
) -> float:
    seconds = d.ToNanoseconds() / 1e9
    if seconds < 0 or (seconds == 0 and not allow_zero):
        v.add(reason, field, f"must be positive, got {seconds}s")
    elif seconds > maximum:
        v.add(reason, field, f"must be at most {maximum}s, got {seconds}s")
    return seconds


def grace_from_pb(
    v: Violations, g: tpb.GracePeriods, base: GracePeriods, limits: Limits, field: str
) -> GracePeriods:
    values: dict[str, float] = {}
    for stage in ("sigint", "sigterm", "sigkill"):
        if g.HasField(stage):
            values[stage] = check_duration(
                v, getattr(g, stage), f"{field}.{stage}", "INVALID_GRACE", limits.max_grace_seconds
            )
        else:
            values[stage] = getattr(base, stage)
    return GracePeriods(**values)


def check_labels(v: Violations, labels: Any, limits: Limits, field: str = "labels") -> None:
    if len(labels) > limits.max_labels:
        v.add("INVALID_LABELS", field, f"at most {limits.max_labels} labels, got {len(labels)}")
    for key, value in labels.items():
        if len(key) > limits.max_label_key_chars or not _LABEL_KEY.match(key):
            v.add(
                "INVALID_LABELS",
                f"{field}[{key}]",
                f"label keys are lowercase [a-z0-9_.-], at most {limits.max_label_key_chars} chars",
            )
        if len(value) > limits.max_label_value_chars:
            v.add(
                "INVALID_LABELS",
                f"{field}[{key}]",
                f"label values are at most {limits.max_label_value_chars} chars",
            )


def check_request_id(v: Violations, request_id: str, limits: Limits) -> None:
    if len(request_id) > limits.max_request_id_chars:
        v.add(
            "INVALID_REQUEST_ID",
            "request_id",
            f"at most {limits.max_request_id_chars} chars",
        )


def check_filter(v: Violations, f: spb.TaskFilter, field: str = "filter") -> None:
    valid = {s.value for s in TaskState}
    for i, s in enumerate(f.states):
        if s not in valid:
            v.add("INVALID_FILTER", f"{field}.states[{i}]", f"unknown task state {s}")
    check_labels(v, f.labels, Limits(max_labels=10_000), f"{field}.labels")
    if len(f.names) > MAX_FILTER_NAMES:
        v.add(
            "INVALID_FILTER",
            f"{field}.names",
            f"at most {MAX_FILTER_NAMES} names, got {len(f.names)}",
        )
        return
    for i, name in enumerate(f.names):
        if not is_task_name(name):
            v.add(
                "INVALID_FILTER",
                f"{field}.names[{i}]",
                f"{name!r} is not a task name like tasks/{{id}}",
            )


def retry_from_pb(
    v: Violations, r: tpb.RetryPolicy, default: RetryPolicy, limits: Limits, field: str
) -> RetryPolicy:
    """A request's retry policy; unset fields take the server's default policy's values.

    Unknown reasons, out-of-range numbers and negative durations are field violations
    (reason INVALID_RETRY_POLICY) naming ``{field}.{name}``.
    """
    reasons: set[ErrorReason] = set()
    for i, name in enumerate(r.retry_on):
        try:
            reasons.add(ErrorReason(name))
        except ValueError:
            v.add("INVALID_RETRY_POLICY", f"{field}.retry_on[{i}]", f"{name!r} is not a reason")
    max_attempts = r.max_attempts or default.max_attempts
    retry_on = frozenset(reasons) if r.retry_on else default.retry_on
    if max_attempts > 1 and not retry_on:
        retry_on = DEFAULT_RETRY_ON
    values: dict[str, float] = {}
    given = {
        "initial_backoff": r.initial_backoff if r.HasField("initial_backoff") else None,
        "max_backoff": r.max_backoff if r.HasField("max_backoff") else None,
    }
    for name, backoff in given.items():
        if backoff is not None:
            values[name] = check_duration(
                v,
                backoff,
                f"{field}.{name}",
                "INVALID_RETRY_POLICY",
                limits.max_timeout_seconds,
                allow_zero=True,
            )
    initial = values.get("initial_backoff", default.initial_backoff)
    policy = RetryPolicy(
        max_attempts=max_attempts,
        retry_on=retry_on,
        initial_backoff=initial,
        max_backoff=values.get("max_backoff", max(default.max_backoff, initial)),
        multiplier=r.backoff_multiplier or default.multiplier,
        jitter=r.jitter,
    )
    for name, description in validate_policy(policy):
        v.add("INVALID_RETRY_POLICY", f"{field}.{name}", description)
    return policy
