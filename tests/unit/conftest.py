"""Fixtures shared by the unit tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tether_server.runtime.guard import GUARD


@pytest.fixture
def guard() -> Iterator[None]:
    """tether's SIGINT/SIGTERM guard installed in this process, as on an engine; the
    previous handlers come back after the test."""
    original_int = signal.getsignal(signal.SIGINT)
    original_term = signal.getsignal(signal.SIGTERM)
    GUARD.install()
    try:
        yield
    finally:
        GUARD.uninstall()
        signal.signal(signal.SIGINT, original_int)
        signal.signal(signal.SIGTERM, original_term)
