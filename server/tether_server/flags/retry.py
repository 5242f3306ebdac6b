"""Flags of work that runs again: the default retry policy and preemption."""

from __future__ import annotations

import argparse

from ..core.model import ErrorReason, RetryPolicy
from ..core.retry import DEFAULT_RETRY_ON, RETRYABLE_REASONS, validate_policy
from .values import comma_list, duration

__all__ = ["add_flags", "policy"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "retries and preemption",
        "the retry policy of tasks whose request gives none, and which tasks may be preempted",
    )
    group.add_argument(
        "--retry-max-attempts",
        type=int,
        default=1,
        help="default retry policy: attempts that may fail, the first included (default 1: no retry)",
    )
    group.add_argument(
        "--retry-on",
        type=_retry_reasons,
        default=None,
        metavar="REASON[,REASON...]",
        help="default retry policy: failure reasons retried, among "
        + ", ".join(sorted(r.value for r in RETRYABLE_REASONS))
        + " (default ENGINE_LOST,CLUSTER_LOST)",
    )
    group.add_argument(
        "--retry-initial-backoff",
        type=duration,
        default=1.0,
        help="default retry policy: wait before the first retry (default 1s)",
    )
    group.add_argument(
        "--retry-max-backoff",
        type=duration,
        default=30.0,
        help="default retry policy: longest wait between attempts (default 30s)",
    )
    group.add_argument(
        "--retry-multiplier",
        type=float,
        default=2.0,
        help="default retry policy: growth of the wait per retry (default 2)",
    )
    group.add_argument(
        "--retry-jitter",
        type=float,
        default=0.2,
        help="default retry policy: random spread of each wait, a fraction in [0, 1] (default 0.2)",
    )
    group.add_argument(
        "--preemptible-tasks",
        type=comma_list,
        default=(),
        metavar="NAME[,NAME...]",
        help="task names submitted as preemptible unless the request says otherwise (default: none)",
    )
    group.add_argument(
        "--preempt-min-runtime",
        type=duration,
        default=10.0,
        help="time a preempted task runs in its next attempt before it can be preempted again (default 10s)",
    )


def policy(parser: argparse.ArgumentParser, a: argparse.Namespace) -> RetryPolicy:
    """The default retry policy of the --retry-* flags, checked as a request's would be."""
    retry = RetryPolicy(
        max_attempts=a.retry_max_attempts,
        retry_on=a.retry_on if a.retry_on is not None else DEFAULT_RETRY_ON,
        initial_backoff=a.retry_initial_backoff,
        max_backoff=a.retry_max_backoff,
        multiplier=a.retry_multiplier,
        jitter=a.retry_jitter,
    )
    for name, problem in validate_policy(retry):
        parser.error(f"--retry-{name.replace('_', '-').removeprefix('backoff-')}: {problem}")
    return retry


def _retry_reasons(text: str) -> frozenset[ErrorReason]:
    """--retry-on: comma-separated failure reasons, each one a policy may retry."""
    reasons = set()
    for name in filter(None, text.split(",")):
        try:
            reason = ErrorReason(name.strip().upper())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name!r} is not a failure reason") from None
        if reason not in RETRYABLE_REASONS:
            raise argparse.ArgumentTypeError(f"{name} cannot be retried")
        reasons.add(reason)
    return frozenset(reasons)
