"""What tether changes in an engine's ipykernel so that a task costs less around it.

``setup_engine`` calls :func:`tune` once per engine. Each change leaves what the engine
shows and answers as it was:

* the session remembers a bounded number of message signatures (replay protection),
  not jupyter_client's 65,536 (about 10 MB per engine, filled over its first tasks);
* the kernel's logger skips the records that every one of its handlers would drop, and
  on engines tether started, logs at the level it asked for (``log_level``; ipyparallel
  9.2 leaves the handler at INFO whatever ``--IPEngine.log_level`` says, which writes a
  "Handling apply_request" line per task into the engine's log file);
* tether's own requests publish no ``busy``/``idle`` status on IOPub. ipyparallel's
  client only uses them to resolve a request's output future, which tether resolves
  with the reply; every other request (another client's, on an attached cluster) still
  gets both;
* ``sys.stdout.flush()`` and ``sys.stderr.flush()``, which the kernel calls after every
  request, return at once when nothing is waiting to be sent. ipykernel's
  ``OutStream.flush`` always hands two callbacks to its IOPub thread and waits for the
  second, twice per request, although tasks write their output through ``ctx.output``
  (8 % of an engine's CPU under no-op load). Anything written schedules a flush, so
  "nothing pending" means that everything written is sent, or being sent by the IOPub
  thread; whatever is published after it is queued behind it on that thread, so the
  order of IOPub messages is the same (only a wait for a send already under way is
  skipped).

Measured with py-spy on an engine running no-op tasks: the DEBUG records were 8 % of its
CPU and the two status messages 10-17 %; each status message also costs the hub's IOPub
forwarder a message.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Final

__all__ = ["REQUEST_LABEL_PREFIX", "tune"]

REQUEST_LABEL_PREFIX: Final = "tether:"
"""How the ``label`` in the metadata of every request tether sends to run a task
begins (``cluster/hub_records.label``)."""


def tune(kernel: Any, *, signatures: int, log_level: int | None) -> None:
    """Apply this module's changes to ``kernel`` (None outside an engine: nothing)."""
    if kernel is None:
        return
    session = getattr(kernel, "session", None)
    if signatures > 0 and session is not None:
        session.digest_history_size = signatures
    logger = getattr(kernel, "log", None)
    if isinstance(logger, logging.Logger) and log_level is not None:
        logger.setLevel(int(log_level))
    skip_dropped_log_records(logger)
    quiet_tether_requests(kernel)
    for stream in (sys.stdout, sys.stderr):
        skip_idle_flushes(stream)


def skip_dropped_log_records(logger: Any) -> None:
    """Raise ``logger`` to the lowest level any handler on its path shows.

    The engine app applies ``--IPEngine.log_level`` to its handlers, not to the logger,
    so every request still builds several DEBUG records that each handler then drops.
    Records below every handler's level are never shown: skipping them changes no
    output."""
    if not isinstance(logger, logging.Logger):
        return
    levels: list[int] = []
    node: logging.Logger | None = logger
    while node is not None:
        levels += [handler.level for handler in node.handlers]
        node = node.parent if node.propagate else None
    if not levels and logging.lastResort is not None:
        levels.append(logging.lastResort.level)
    if levels and min(levels) > logger.getEffectiveLevel():
        logger.setLevel(min(levels))


def quiet_tether_requests(kernel: Any) -> None:
    """Publish no shell ``busy``/``idle`` status for tether's requests (idempotent)."""
    publish = kernel._publish_status
    if getattr(publish, "tether_quiet", False):
        return

    def publish_status(status: str, channel: str, parent: Any = None) -> None:
        request = parent or kernel.get_parent(channel)
        if channel == "shell" and is_tether_request(request):
            return
        publish(status, channel, parent)

    quiet: Callable[..., None] = publish_status
    quiet.tether_quiet = True  # type: ignore[attr-defined]
    kernel._publish_status = quiet


def skip_idle_flushes(stream: Any) -> None:
    """Make ``stream.flush()`` return at once when nothing is pending (an ipykernel
    ``OutStream`` without an echo only; idempotent)."""
    flush = getattr(stream, "flush", None)
    if (
        flush is None
        or getattr(flush, "tether_lean", False)
        or not hasattr(stream, "_flush_pending")
        or getattr(stream, "echo", None) is not None
    ):
        return

    def lean_flush() -> None:
        if stream._flush_pending or getattr(stream, "_subprocess_flush_pending", False):
            flush()

    lean: Callable[[], None] = lean_flush
    lean.tether_lean = True  # type: ignore[attr-defined]
    stream.flush = lean


def is_tether_request(request: Any) -> bool:
    """Whether ``request`` (a deserialized message) is one of tether's task requests."""
    if not isinstance(request, dict):
        return False
    metadata = request.get("metadata")
    label = metadata.get("label") if isinstance(metadata, dict) else None
    return isinstance(label, str) and label.startswith(REQUEST_LABEL_PREFIX)
