"""tether's own subscriber on the cluster's IOPub channel: the runtime's reports.

The runtime publishes each report of a task (progress, output, checkpoints) and the
engine's load reports as ipyparallel data messages (``publish_data``) carrying
``{"tether": [kind, task_id, attempt, payload]}``. :class:`ReportWatcher` reads those on
a SUB socket of its own, subscribed to data messages only, and hands each to a callback
on the loop.

The ipyparallel client's own IOPub socket is unsubscribed (:func:`quiet_client_iopub`):
what else arrives there (status messages, each decoded and signature-checked by the
client) only resolved the output futures of requests, which tether's requests do not
have (``LoopClient.request_apply``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio
from ipyparallel.serialize import deserialize_object
from jupyter_client.session import Session

__all__ = ["ReportWatcher", "quiet_client_iopub"]

log = logging.getLogger(__name__)

DATA_TOPIC = b"datapub"
"""The topic ``publish_data`` sends on."""

OnReport = Callable[[str, int, str, Any], None]
"""(task_id, attempt, kind, payload)."""


def quiet_client_iopub(client: Any) -> None:
    """Unsubscribe the ipyparallel client's IOPub socket (see the module docstring)."""
    client._iopub_socket.setsockopt(zmq.UNSUBSCRIBE, b"")


class ReportWatcher:
    """Reads the runtime's reports off IOPub until :meth:`stop`."""

    def __init__(self, connection: dict[str, Any], signatures: int, on_report: OnReport) -> None:
        """``connection``: the client's connection info (``Client._config``): the IOPub
        address, the key and the packers; ``signatures``: how many message signatures
        the session remembers to refuse replays."""
        self._session = Session(
            key=connection["key"].encode(),
            signature_scheme=connection["signature_scheme"],
            packer=connection["pack"],
            unpacker=connection["unpack"],
            digest_history_size=signatures,
        )
        self._address = str(connection["iopub"])
        self._on_report = on_report
        self._socket: Any = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        # Only data messages: every other request publishes status messages, which
        # would cost a decode and an HMAC check each.
        sock.setsockopt(zmq.SUBSCRIBE, DATA_TOPIC)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self._address)
        self._socket = sock
        self._task = asyncio.ensure_future(self._run(sock))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _run(self, sock: Any) -> None:
        session = self._session
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                _idents, msg_frames = session.feed_identities(frames, copy=False)
                msg = session.deserialize(msg_frames, content=True, copy=False)
                if msg["header"]["msg_type"] != "data_message":
                    continue
                data, _ = deserialize_object(msg["buffers"])
                item = data.get("tether") if isinstance(data, dict) else None
                if not item:
                    continue
                kind, task_id, attempt, payload = item
                self._on_report(str(task_id), int(attempt), str(kind), payload)
            except Exception:  # one bad message must never stop the watcher
                log.exception("could not decode an IOPub message")
