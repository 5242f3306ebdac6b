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

import asyncio
import logging
import pickle
from hmac import compare_digest
from typing import Any

import ipyparallel as ipp
from ipyparallel import error, serialize
from ipyparallel.serialize.serialize import PICKLE_PROTOCOL
from tornado.ioloop import IOLoop

__all__ = ["LoopClient"]

log = logging.getLogger(__name__)


class LoopClient(ipp.Client):  # type: ignore[misc]
    """``ipyparallel.Client`` without its IO thread: call :meth:`attach` on the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._requests: dict[str, tuple[asyncio.Future[Any], str]] = {}
        """tether's own requests (``request_apply``): their futures and engines, by msg_id."""
        self._packed_functions: dict[Any, list[Any]] = {}
        """Each function tether applies, serialized once (``serialize_object`` pickles its
        code object every time: 4 % of the server's CPU under load, docs/benchmarks.md)."""
        self._packed_info: dict[int, bytes] = {}
        super().__init__(*args, **kwargs)

    def _start_io_thread(self) -> None:
        """The stock client starts its IO thread here, at the end of the connection;
        this one waits for :meth:`attach` (the connection runs off the loop)."""

    def attach(self) -> None:
        """Serve the client's sockets on the running asyncio loop (call it there, once)."""
        self._io_loop = IOLoop.current()
        self._setup_streams()
        self._mux_stream.on_recv(self._on_mux_reply, copy=False)

    def request_apply(
        self, engine_uuid: str, function: Any, arg: Any, label: str
    ) -> asyncio.Future[Any]:
        """Send ``function(arg)`` to one engine on the mux; the future of its reply.

        The future's value is what ipyparallel would store as the request's result:
        the function's return value, or the engine's error as an exception object
        (``RemoteError``; ``EngineError`` when the engine died with it). ``label`` goes
        into the request's metadata, hence the hub's record.

        Leaner than ``send_apply_request``: no ``MessageFuture`` pair (each with its
        ``threading.Condition``), no per-request metadata, history or results, no
        output future (the client hears no IOPub). The request is still registered as
        outstanding on its engine, so an engine that unregisters strands it and
        ``_handle_stranded_msgs`` answers it with ``EngineError`` as for any request.
        """
        if self._closed:
            raise RuntimeError("the ipyparallel client is closed")
        msg = self.session.msg("apply_request", metadata={"label": label} if label else {})
        msg_id = msg["header"]["msg_id"]
        buffers = self._pack_apply(function, arg)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests[msg_id] = (future, engine_uuid)
        self._outstanding_dict[engine_uuid].add(msg_id)
        self.session.send(self._mux_stream, msg, buffers=buffers, ident=engine_uuid.encode())
        return future

    def _pack_apply(self, function: Any, arg: Any) -> list[Any]:
        """What ``serialize.pack_apply_message(function, [arg], {})`` returns, the
        function's part cached."""
        head = self._packed_functions.get(function)
        if head is None:
            head = self._packed_functions[function] = serialize.serialize_object(function)
        arg_buffers = serialize.serialize_object(
            arg,
            buffer_threshold=self.session.buffer_threshold,
            item_threshold=self.session.item_threshold,
        )
        info = self._packed_info.get(len(arg_buffers))
        if info is None:
            layout = {"nargs": 1, "narg_bufs": len(arg_buffers), "kw_keys": []}
            info = self._packed_info[len(arg_buffers)] = pickle.dumps(layout, PICKLE_PROTOCOL)
        return [*head, info, *arg_buffers]

    def _on_mux_reply(self, frames: list[Any]) -> None:
        """A reply on the mux. tether's own are read here with only what they need: the
        signature checked as ``Session.deserialize`` checks it, then the parent's id, the
        content and the buffers; no dates parsed, no metadata, no ``decorator`` wrapper
        (``unpack_message``): half the cost of the stock path. Others go the stock way."""
        session = self.session
        _idents, parts = session.feed_identities(frames, copy=False)
        if len(parts) < 5:
            self._dispatch_reply(frames)  # the stock path reports the malformed message
            return
        head = [part.bytes for part in parts[:5]]
        parent = session.unpack(head[2])
        msg_id = parent.get("msg_id") if isinstance(parent, dict) else None
        if msg_id not in self._requests:
            self._dispatch_reply(frames)
            return
        if session.auth is not None:
            signature = head[0]
            if (
                not signature
                or signature in session.digest_history
                or not compare_digest(signature, session.sign(head[1:5]))
            ):
                log.error("invalid reply to request %s: bad or repeated signature", msg_id)
                return
            session._add_digest(signature)
        if session.unpack(head[1]).get("msg_type") != "apply_reply":
            self._dispatch_reply(frames)
            return
        buffers = [memoryview(part.bytes) for part in parts[5:]]
        self._answer(msg_id, session.unpack(head[4]), buffers)

    def _handle_apply_reply(self, msg: dict[str, Any]) -> None:
        """Answer one of tether's requests (a stranded request's stand-in, or a reply that
        came the stock way); any other request's reply goes the stock way."""
        msg_id = msg["parent_header"].get("msg_id")
        if msg_id not in self._requests:
            super()._handle_apply_reply(msg)
            return
        self._answer(msg_id, msg["content"], msg.get("buffers", []))

    def _answer(self, msg_id: str, content: dict[str, Any], buffers: list[Any]) -> None:
        future, engine_uuid = self._requests.pop(msg_id)
        self._outstanding_dict[engine_uuid].discard(msg_id)
        value: Any
        if content["status"] == "ok":
            value = serialize.deserialize_object(buffers)[0]
        elif content["status"] == "aborted":
            value = error.TaskAborted(msg_id)
        else:
            value = self._unwrap_exception(content)
        if not future.done():
            future.set_result(value)

    def pending_requests(self) -> int:
        """tether's requests that have no answer yet."""
        return len(self._requests)

    def _stop_io_thread(self) -> None:
        """Called by ``close``: take the streams off the loop (``close`` then closes the
        sockets)."""
        for name in _STREAMS:
            stream: Any = getattr(self, name, None)
            if stream is not None and not stream.closed():
                stream.close(linger=0)
        # Nothing will answer them now: whoever awaits one is cancelled, not left waiting.
        requests, self._requests = self._requests, {}
        for future, _engine_uuid in requests.values():
            future.cancel()


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
