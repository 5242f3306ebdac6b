"""The store's exceptions."""

from __future__ import annotations

__all__ = ["StoreError", "StoreWriteError"]


class StoreError(Exception):
    """The store cannot do what was asked (not open, closed, or a file it cannot use)."""


class StoreWriteError(StoreError):
    """A batch was not written; nothing of it is in the database. ``__cause__`` says why."""
