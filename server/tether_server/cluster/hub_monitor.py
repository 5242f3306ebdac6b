"""The embedded hub's monitor handlers: what it must know of each message, read cheaply.

ipyparallel's Hub receives a copy of every request and reply that crosses the mux
queue, and of every IOPub message, and decodes each in full: the signature, every
header's dates, the content, then a task record for its database. tether's embedded
hub keeps no records (``NoDB``), so all it needs of a request is its id (``pending``
and the engine's queue, which ``queue_status`` counts and tether asks at engine setup),
of a reply its parent's id, and of IOPub only ``shutdown_reply``. Measured under
no-op load, that decoding was most of the hub's CPU per task, on the same two cores
as the server and the engines.

:func:`install` replaces the three handlers on the ``Hub`` class. Each keeps the stock
behaviour whenever the hub has a database (an operator's ``DictDB`` or ``SQLiteDB``), and
hands anything it cannot read to the stock handler, which logs it as before. A request
or reply whose signature does not match is not counted, as before.

Imported in the controller process only.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

__all__ = ["install"]


def install(hub_class: Any, no_db_class: type) -> None:
    """Put the lean handlers on ``hub_class`` (ipyparallel's ``Hub``), once."""
    if getattr(hub_class, "_tether_lean_monitor", False):
        return
    stock_request = hub_class.save_queue_request
    stock_result = hub_class.save_queue_result
    stock_iopub = hub_class.monitor_iopub_message

    def save_queue_request(self: Any, idents: list[bytes], msg: list[bytes]) -> None:
        found = _lean_ids(self, idents, msg, no_db_class, frame=1, engine_ident=0)
        if found is None:
            stock_request(self, idents, msg)  # it logs what it cannot take
            return
        eid, msg_id = found
        self.pending.add(msg_id)
        self.queues[eid].append(msg_id)

    def save_queue_result(self: Any, idents: list[bytes], msg: list[bytes]) -> None:
        found = _lean_ids(self, idents, msg, no_db_class, frame=2, engine_ident=1)
        if found is None:
            stock_result(self, idents, msg)
            return
        eid, msg_id = found
        if msg_id in self.pending:
            self.pending.remove(msg_id)
            self.all_completed.add(msg_id)
            queue = self.queues[eid]
            if msg_id in queue:
                queue.remove(msg_id)
            self.completed[eid].append(msg_id)
        elif msg_id not in self.all_completed:
            self.log.warning("queue:: unknown msg finished %r", msg_id)

    def monitor_iopub_message(self: Any, topics: list[bytes], msg: list[bytes]) -> None:
        # Without a database the stock handler acts on shutdown_reply only.
        if isinstance(self.db, no_db_class) and len(msg) > 1:
            try:
                msg_type = json.loads(msg[1]).get("msg_type")
            except (ValueError, AttributeError):
                msg_type = None
            if msg_type is not None and msg_type != "shutdown_reply":
                return
        stock_iopub(self, topics, msg)

    hub_class.save_queue_request = save_queue_request
    hub_class.save_queue_result = save_queue_result
    hub_class.monitor_iopub_message = monitor_iopub_message
    hub_class._tether_lean_monitor = True


def _lean_ids(
    hub: Any,
    idents: list[bytes],
    msg: list[bytes],
    no_db_class: type,
    *,
    frame: int,
    engine_ident: int,
) -> tuple[int, str] | None:
    """(engine id, message id) of a signed mux message: the id is read from frame
    ``frame`` (1 the request's header, 2 a reply's parent header), the engine from
    ``idents[engine_ident]``. None when the stock handler should take it: a database,
    a bad signature, an unknown engine, anything odd."""
    if not isinstance(hub.db, no_db_class) or len(idents) < 2 or len(msg) < 5:
        return None
    frames = [bytes(f) for f in msg[:5]]
    session = hub.session
    if session.auth is not None and not hmac.compare_digest(frames[0], session.sign(frames[1:5])):
        return None
    try:
        decoded = json.loads(frames[frame])
    except ValueError:
        return None
    msg_id = decoded.get("msg_id") if isinstance(decoded, dict) else None
    eid = hub.by_ident.get(idents[engine_ident])
    if eid is None or not isinstance(msg_id, str):
        return None
    return eid, msg_id
