"""The hub's task records: what a restarted controller reads to re-attach (attached mode).

ipyparallel's hub keeps a record of every request it routes (``TaskRecord``: header,
metadata, the engine, submission and completion times, the reply) in its database
(``IPController.db_class``: DictDB by default for ``ipcluster``, SQLiteDB or MongoDB on
request; tether's embedded hub runs with NoDB, which keeps none). tether labels each task
it sends (``label``, a field the hub copies from the request's metadata into the record),
so a restarted controller finds its attempts with a query and reads their replies.

Both calls are the async forms of ``Client.db_query`` and ``Client.result_status``
(which block until the reply comes): on the loop, with a timeout.
:func:`query` is the one request/reply on the hub's query socket they (and the
controller's liveness probe and queue counts, ``ipp``) are made of.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ipyparallel import serialize, util

from ..runtime.kernel_tuning import REQUEST_LABEL_PREFIX


def label(epoch: str, task_id: str, attempt: int) -> str:
    """The hub-record label of one attempt: the store's epoch keeps two tether servers
    that share a cluster (with separate data dirs) apart."""
    return f"{REQUEST_LABEL_PREFIX}{epoch}:{task_id}:{attempt}"


def parse_label(text: Any, epoch: str) -> tuple[str, int] | None:
    """(task_id, attempt) of a label of this epoch, else None."""
    if not isinstance(text, str):
        return None
    prefix = f"{REQUEST_LABEL_PREFIX}{epoch}:"
    if not text.startswith(prefix):
        return None
    task_id, _, attempt = text[len(prefix) :].rpartition(":")
    if not task_id or not attempt.isdigit():
        return None
    return task_id, int(attempt)


@dataclass(frozen=True, slots=True)
class HubRecord:
    msg_id: str
    label: str
    engine_uuid: str
    submitted: float
    completed: bool


async def query(
    client: Any, msg_type: str, content: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Send one request on the hub's query socket and await its reply (the whole message).

    Raises ``TimeoutError`` when the hub does not answer within ``timeout`` seconds.
    """
    fut = client._send(client._query_stream, msg_type, content=content)
    reply: dict[str, Any] = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
    return reply


async def find(client: Any, where: dict[str, Any], timeout: float) -> list[HubRecord]:
    """The records matching ``where`` (a MongoDB-style query the hub's database runs)."""
    keys = ["msg_id", "label", "engine_uuid", "submitted", "completed"]
    reply = await query(client, "db_request", {"query": where, "keys": keys}, timeout)
    content = reply["content"]
    if content.get("status") != "ok":
        raise client._unwrap_exception(content)
    return [
        HubRecord(
            msg_id=str(rec["msg_id"]),
            label=str(rec.get("label") or ""),
            engine_uuid=str(rec.get("engine_uuid") or ""),
            submitted=_seconds(rec.get("submitted")),
            completed=rec.get("completed") is not None,
        )
        for rec in content["records"]
    ]


async def result(client: Any, msg_id: str, timeout: float) -> tuple[bool, Any]:
    """(False, None) while ``msg_id`` is pending; (True, value) once it ended, where value
    is what the engine returned, or the exception it raised (``RemoteError``)."""
    request = {"msg_ids": [msg_id], "status_only": False}
    reply = await query(client, "result_request", request, timeout)
    content = reply["content"]
    if content.get("status") != "ok":
        raise client._unwrap_exception(content)
    if msg_id not in content.get("completed", ()):
        return False, None
    rec = content[msg_id]
    rcontent = rec["result_content"]
    if isinstance(rcontent, str):
        rcontent = client.session.unpack(rcontent)
    if rcontent.get("status") != "ok":
        return True, client._unwrap_exception(rcontent)
    value, _rest = serialize.deserialize_object(reply["buffers"])
    return True, value


def _seconds(value: Any) -> float:
    if isinstance(value, str):
        value = util._parse_date(value)
    return value.timestamp() if isinstance(value, datetime) else 0.0
