"""Retry policy: which failed attempts run again, and after how long.

A task may run several attempts (DESIGN §16). When an attempt ends in a failure,
:func:`retry_delay` decides whether the task goes back to PENDING for another
attempt, and how long it waits first; ``ControlCore`` does the bookkeeping. The
rules, in one place:

* only the reasons in ``RETRYABLE_REASONS`` can be retried, and only those the
  task's policy names; a user's interrupt (reason INTERRUPTED), a cancellation,
  a queue timeout or a shutdown are final, whatever the policy says;
* ``max_attempts`` counts the attempts that ended in a retried (or retryable)
  failure, the first run included. Preempted attempts are not failures and do not
  count: a task preempted five times still has all its retries;
* the wait is exponential with jitter: ``initial * multiplier ** (n - 1)`` for the
  n-th failure, capped at ``max_backoff``, then spread by ``jitter`` (a fraction)
  with a random source the caller injects, so tests are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

from .model import AttemptEnding, ErrorReason, RetryPolicy, Task

RETRYABLE_REASONS = frozenset(
    {
        ErrorReason.ENGINE_LOST,
        ErrorReason.CLUSTER_LOST,
        ErrorReason.RESOURCE_LIMIT,
        ErrorReason.TASK_RAISED,
        ErrorReason.TIMED_OUT,
    }
)
"""Failure reasons a retry policy may name. Everything else ends the task for good."""

DEFAULT_RETRY_ON = frozenset({ErrorReason.ENGINE_LOST, ErrorReason.CLUSTER_LOST})
"""What a policy with ``max_attempts > 1`` and no reasons retries: the failures that are
never the task's own fault."""

RETRIED_AS = {ErrorReason.CONTROLLER_RESTARTED: ErrorReason.CLUSTER_LOST}
"""Endings a policy treats as another reason: a restart of the controller took the
embedded cluster (and the attempt) with it, so a policy retrying CLUSTER_LOST retries it."""

MAX_ATTEMPTS_LIMIT = 100
"""The most attempts a policy may ask for."""


def failed_attempts(task: Task) -> int:
    """Attempts of ``task`` that ended in a failure that was retried."""
    return sum(1 for a in task.attempts if a.ending is AttemptEnding.RETRIED)


def backoff(policy: RetryPolicy, failures: int, uniform: Callable[[], float]) -> float:
    """Seconds to wait before the attempt that follows the ``failures``-th failure.

    ``uniform()`` returns a float in [0, 1) (``random.random``); the jitter spreads
    the wait evenly over ``[w * (1 - jitter), w * (1 + jitter)]``, then the cap applies.
    """
    if failures < 1:
        raise ValueError("failures must be at least 1")
    base = policy.initial_backoff * policy.multiplier ** min(failures - 1, 64)
    spread = 1.0 + policy.jitter * (2.0 * uniform() - 1.0)
    return max(0.0, min(policy.max_backoff, base * spread))


def retry_delay(task: Task, reason: ErrorReason, uniform: Callable[[], float]) -> float | None:
    """The wait before ``task`` runs again after its current attempt failed for
    ``reason``; None when the failure is final (no policy, a reason it does not
    retry, or no attempt left)."""
    policy = task.retry
    reason = RETRIED_AS.get(reason, reason)
    if policy is None or reason not in RETRYABLE_REASONS or reason not in policy.retry_on:
        return None
    failures = failed_attempts(task) + 1  # the attempt that just failed included
    if failures >= policy.max_attempts:
        return None
    return backoff(policy, failures, uniform)


def validate_policy(policy: RetryPolicy) -> list[tuple[str, str]]:
    """What is wrong with ``policy``, as (field, description) pairs; empty when it is fine."""
    problems: list[tuple[str, str]] = []
    if not 1 <= policy.max_attempts <= MAX_ATTEMPTS_LIMIT:
        problems.append(("max_attempts", f"must be between 1 and {MAX_ATTEMPTS_LIMIT}"))
    unknown = sorted(r.value for r in policy.retry_on - RETRYABLE_REASONS)
    if unknown:
        allowed = ", ".join(sorted(r.value for r in RETRYABLE_REASONS))
        problems.append(("retry_on", f"{', '.join(unknown)} cannot be retried (only {allowed})"))
    if policy.initial_backoff < 0:
        problems.append(("initial_backoff", "must not be negative"))
    if policy.max_backoff < policy.initial_backoff:
        problems.append(("max_backoff", "must be at least initial_backoff"))
    if policy.multiplier < 1:
        problems.append(("backoff_multiplier", "must be at least 1"))
    if not 0 <= policy.jitter <= 1:
        problems.append(("jitter", "must be between 0 and 1"))
    return problems
