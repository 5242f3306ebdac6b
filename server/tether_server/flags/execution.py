"""Flags of how tasks run: which are registered, how they are dispatched, the interrupt
ladder's graces, timeouts, and the limits on a task's arguments and memory."""

from __future__ import annotations

import argparse

from ..core.model import GracePeriods
from ..core.pool import MAX_PIPELINE_DEPTH
from .values import duration, size

__all__ = ["add_flags", "grace"]


def pipeline_depth(text: str) -> int:
    """``--pipeline-depth``: an integer from 1 to ``MAX_PIPELINE_DEPTH``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_PIPELINE_DEPTH:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_PIPELINE_DEPTH}, not {value}")
    return value


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "tasks", "registration, dispatch, the interrupt ladder, timeouts and limits"
    )
    group.add_argument(
        "--task-module",
        action="append",
        default=[],
        dest="task_modules",
        help="import this module on the server and engines to register tasks (repeatable)",
    )
    group.add_argument(
        "--pipeline-depth",
        type=pipeline_depth,
        default=8,
        help="tasks each engine holds at most (1-32): the next task is sent while one runs, so "
        "an engine never idles for a round trip (signals stay exact: they name their attempt); "
        "tasks whose recent runs took under 20 ms are queued deeper and sent several to a "
        "request (half the depth); 1 sends a task only to an idle engine; attached mode "
        "holds 2 at most (default %(default)s)",
    )
    group.add_argument(
        "--grace-sigint",
        type=duration,
        default=2.0,
        help="time after SIGINT before SIGTERM (default 2s)",
    )
    group.add_argument(
        "--grace-sigterm",
        type=duration,
        default=2.0,
        help="time after SIGTERM before SIGKILL (default 2s)",
    )
    group.add_argument(
        "--grace-sigkill",
        type=duration,
        default=5.0,
        help="time to wait for a killed engine's death (default 5s)",
    )
    group.add_argument(
        "--default-timeout",
        type=duration,
        default=None,
        help="timeout of tasks that give none (default: none)",
    )
    group.add_argument(
        "--default-queue-timeout",
        type=duration,
        default=None,
        help="queue timeout of tasks that give none: a task still PENDING after it ends "
        "FAILED / QUEUE_TIMEOUT (default: none)",
    )
    group.add_argument(
        "--unschedulable-queue-timeout",
        type=duration,
        default=600.0,
        help="queue timeout of a task that gives none while no engine carries its "
        "required_tags (attached mode; embedded mode refuses such a task at submit) "
        "(default 10m)",
    )
    group.add_argument(
        "--memory-limit",
        type=size,
        default=0,
        help="interrupt a task whose engine RSS exceeds this (e.g. 2GiB; default off)",
    )
    group.add_argument(
        "--rss-tolerance",
        type=size,
        default=64 * 1024**2,
        help="RSS growth after a task that still counts as reclaimed",
    )
    group.add_argument(
        "--max-args-bytes", type=size, default=64 * 1024, help="largest accepted task arguments"
    )


def grace(a: argparse.Namespace) -> GracePeriods:
    """The escalation ladder's default graces."""
    return GracePeriods(a.grace_sigint, a.grace_sigterm, a.grace_sigkill)
