"""Flags of what the server keeps: the data directory, the event log and task cache,
and the live streams that read them."""

from __future__ import annotations

import argparse
from pathlib import Path

from .values import duration

__all__ = ["add_flags", "check", "data_dir"]


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "store and streams", "where records live, how much history is kept, stream limits"
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the SQLite store and cluster files live (default: the user's state dir)",
    )
    group.add_argument(
        "--retain-events",
        type=int,
        default=200_000,
        help="events kept in the store's log; older resume tokens expire (default %(default)s)",
    )
    group.add_argument(
        "--memory-events",
        type=int,
        default=5_000,
        help="newest events held in memory for live streams; older replays read the store (default %(default)s)",
    )
    group.add_argument(
        "--task-cache",
        type=int,
        default=2_000,
        help="finished tasks cached in memory; the rest is read from the store (default %(default)s)",
    )
    group.add_argument(
        "--checkpoint-interval",
        type=duration,
        default=5.0,
        help="checkpoint cadence of idle streams",
    )
    group.add_argument(
        "--max-streams-per-principal",
        type=int,
        default=2000,
        help="open StreamTaskStatus calls one principal may hold (default %(default)s)",
    )
    group.add_argument(
        "--subscriber-queue",
        type=int,
        default=1024,
        help="events a subscriber may lag before it is cut off",
    )


def check(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for flag in ("retain_events", "memory_events", "task_cache"):
        if getattr(a, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")


def data_dir(a: argparse.Namespace) -> Path:
    """--data-dir, absolute; by default the user's state directory."""
    return (a.data_dir or default_data_dir()).expanduser().resolve()


def default_data_dir() -> Path:
    try:
        from platformdirs import user_state_dir

        return Path(user_state_dir("tether"))
    except ImportError:  # pragma: no cover
        return Path.home() / ".local" / "state" / "tether"
