"""An ipyparallel ``Client`` whose sockets are served by tether's own asyncio loop.

ipyparallel's ``Client`` runs its ZMQ streams on a private IO thread: every request is
handed to that thread (``IOLoop.add_callback``: a self-pipe write and a thread switch) and
every reply comes back from it (``call_soon_threadsafe``: another one), and the two
threads take turns at the GIL. A server that sends a request per task pays those
handoffs on every task. Measured (B3/B4, 2-core box, docs/notes.md): within noise of the
threaded client once the client stopped decoding IOPub; kept because every client call
now happens on the thread that owns the sockets.

:class:`LoopClient` connects as the stock client does (the connection request blocks:
tether makes it in a worker thread), starts no IO thread, and :meth:`LoopClient.attach`
then sets up the streams on the loop that calls it. From then on, everything the
client does runs on that loop: sends go out in the loop's next turn (tornado's
``add_callback`` on its own loop is a plain ``call_soon``), replies resolve their
futures in the loop's thread, registration callbacks run there too.

The client's blocking helpers (``wait``, ``AsyncResult.get``, ``Client.spin``, sync
``DirectView.apply``) would wait on the very thread that must serve them: tether never
calls them, and must not.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import ipyparallel as ipp
from ipyparallel import util
from tornado.ioloop import IOLoop

__all__ = ["LoopClient"]


class LoopClient(ipp.Client):  # type: ignore[misc]
    """``ipyparallel.Client`` without its IO thread: call :meth:`attach` on the loop."""

    def _start_io_thread(self) -> None:
        """The stock client starts its IO thread here, at the end of the connection;
        this one waits for :meth:`attach` (the connection runs off the loop)."""

    def attach(self) -> None:
        """Serve the client's sockets on the running asyncio loop (call it there, once)."""
        self._io_loop = IOLoop.current()
        self._setup_streams()

    def _extract_metadata(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The stock metadata, with the engine's ``started`` stamp parsed by
        ``datetime.fromisoformat`` rather than dateutil (6 % of the server's CPU under
        load, measured with py-spy over 6,000 no-ops)."""
        started = msg["metadata"].pop("started", None)
        md: dict[str, Any] = super()._extract_metadata(msg)
        if started is not None:
            md["started"] = _parse_date(started)
        return md

    def _stop_io_thread(self) -> None:
        """Called by ``close``: take the streams off the loop (``close`` then closes the
        sockets)."""
        for name in _STREAMS:
            stream: Any = getattr(self, name, None)
            if stream is not None and not stream.closed():
                stream.close(linger=0)


def _parse_date(text: Any) -> Any:
    """``util._parse_date``'s answer for the ISO 8601 stamps engines send, fast."""
    if isinstance(text, str):
        try:
            stamp = datetime.fromisoformat(text)
        except ValueError:
            stamp = None
        if stamp is not None and stamp.tzinfo is not None:
            return stamp
        return util._parse_date(text)  # naive (read as local time) or unusual
    return text


_STREAMS = (
    "_query_stream",
    "_control_stream",
    "_mux_stream",
    "_task_stream",
    "_iopub_stream",
    "_notification_stream",
    "_broadcast_stream",
)
"""What ``Client._setup_streams`` makes (ipyparallel 9.2)."""
