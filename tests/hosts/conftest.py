"""Fixtures of the multi-host suite: two namespaced hosts with a real sshd (netns.py).

A module defines its own ``server`` fixture (the hosts and flags it tests); the stubs
that talk to it (``channel``, ``tasks``, ``cluster``) are in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns import TestHost, namespaced_hosts


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[TestHost]]:
    """Hosts ``h2`` and ``h3``, made for the module's tests and removed after them."""
    with namespaced_hosts(["h2", "h3"]) as made:
        yield made
