"""Log output: text (the default) or one JSON object a line (``--log-format json``).

A JSON line has ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, the
exception's type and traceback when there is one, and every tether field a call passed
in ``extra``: ``task_id``, ``task``, ``engine_id``, ``state``, ``stage``, ... (the names
in ``FIELDS``). ``EventLogger`` writes one such line per task state change at INFO, so
an operator can follow a task through the logs by its id.

No token is ever logged: the HTTP access log writes the request line and status only,
and the gateway never logs headers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from .core.eventlog import LogEntry
from .core.messages import EventKind

FIELDS = (
    "task_id",
    "task",
    "engine_id",
    "state",
    "stage",
    "reason",
    "revision",
    "principal",
    "method",
    "path",
    "status",
    "duration_seconds",
)
"""``extra`` keys copied into a JSON line (anything else in ``extra`` is ignored)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one record per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exception_type"] = record.exc_info[0].__name__
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Set up the root logger once, for the process (``app.main``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


def _rfc3339(t: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{whole}.{int((t % 1) * 1000):03d}Z"


class EventLogger:
    """Logs each task state change (a controller listener) at INFO on ``tether_server.events``."""

    def __init__(self) -> None:
        self.log = logging.getLogger("tether_server.events")

    def __call__(self, entry: LogEntry) -> None:
        if entry.kind is not EventKind.STATE_CHANGED or not self.log.isEnabledFor(logging.INFO):
            return
        task = entry.task
        fields: dict[str, Any] = {
            "task_id": task.id,
            "task": task.task,
            "state": task.state.name,
            "revision": entry.revision,
        }
        if task.engine_id is not None:
            fields["engine_id"] = task.engine_id
        if task.interrupt is not None and task.state.terminal:
            fields["stage"] = task.interrupt.final_stage.name
        if task.error is not None:
            fields["reason"] = task.error.reason.value
        with contextlib.suppress(Exception):  # logging must not break the controller
            self.log.info("task %s %s", task.name, task.state.name, extra=fields)
