"""How long each task function's recent runs took on their engines: what decides
whether tasks of a function may be queued several deep behind a running one.

A function is *short* when its last ``WINDOW`` runs (at least ``MIN_RUNS``) each took
under ``SHORT_SECONDS`` on the engine (the runtime measures the call itself, the
``seconds`` of its outcome). A function never seen is not short, and one slow run
makes it long again until ``WINDOW`` short runs have followed. Sans I/O: the core
records what ``TaskFinished`` says.
"""

from __future__ import annotations

from collections import deque
from typing import Final

SHORT_SECONDS: Final = 0.02
"""Runs under this are short: a row of ``pipeline_depth`` of them costs the last little wait."""
WINDOW: Final = 8
MIN_RUNS: Final = 3


class Pace:
    """Recent engine-side run times of each task function."""

    def __init__(self) -> None:
        self._runs: dict[str, deque[float]] = {}
        self._short: dict[str, bool] = {}

    def record(self, function: str, seconds: float) -> None:
        runs = self._runs.get(function)
        if runs is None:
            runs = self._runs[function] = deque(maxlen=WINDOW)
        runs.append(seconds)
        self._short[function] = len(runs) >= MIN_RUNS and max(runs) < SHORT_SECONDS

    def short(self, function: str) -> bool:
        """The recent runs of ``function`` were all short (False when unknown)."""
        return self._short.get(function, False)
