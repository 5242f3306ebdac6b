"""LoopClient's own reading of mux replies (cluster/loop_client.py), without a cluster:
replies are built with a real ``jupyter_client.Session`` and fed as ZMQ frames."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import zmq
from ipyparallel import serialize
from jupyter_client.session import Session

from tether_server.cluster.loop_client import LoopClient

ENGINE = "engine-uuid"


def client() -> tuple[Any, list[Any]]:
    """A LoopClient that never connected, its session keyed; and what the stock path got."""
    c: Any = LoopClient.__new__(LoopClient)
    c.__dict__["session"] = Session(key=b"secret", signature_scheme="hmac-sha256")
    c._requests = {}
    c._outstanding_dict = defaultdict(set)
    stock: list[Any] = []
    c._dispatch_reply = stock.append
    return c, stock


def request(c: Any, msg_id: str) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    c._requests[msg_id] = (future, ENGINE)
    c._outstanding_dict[ENGINE].add(msg_id)
    return future


def reply_frames(session: Session, parent_id: str, value: Any, **content: Any) -> list[Any]:
    parent = {"msg_id": parent_id, "msg_type": "apply_request"}
    msg = session.msg("apply_reply", {"status": "ok", **content}, parent=parent)
    parts = [*session.serialize(msg, ident=b"engine-ident"), *serialize.serialize_object(value)]
    return [zmq.Frame(bytes(part)) for part in parts]


def test_a_reply_resolves_its_request_and_a_replayed_copy_is_refused() -> None:
    async def run() -> tuple[Any, int, int]:
        c, stock = client()
        future = request(c, "m1")
        frames = reply_frames(c.session, "m1", {"status": "succeeded"})
        c._on_mux_reply(frames)
        again = request(c, "m1")  # the same msg_id asked again; a replay must not answer it
        c._on_mux_reply(frames)
        return future.result(), again.done(), len(stock)

    value, replay_answered, stock = asyncio.run(run())
    assert value == {"status": "succeeded"}
    assert (replay_answered, stock) == (False, 0)


def test_a_reply_with_a_bad_signature_is_dropped() -> None:
    async def run() -> tuple[bool, set[str]]:
        c, _stock = client()
        future = request(c, "m2")
        forger = Session(key=b"not-the-key", signature_scheme="hmac-sha256")
        c._on_mux_reply(reply_frames(forger, "m2", "forged"))
        return future.done(), c._outstanding_dict[ENGINE]

    done, outstanding = asyncio.run(run())
    assert not done and outstanding == {"m2"}


def test_replies_to_other_requests_and_errors_take_their_paths() -> None:
    async def run() -> tuple[int, Any]:
        c, stock = client()
        c._on_mux_reply(reply_frames(c.session, "not-ours", 1))
        future = request(c, "m3")
        parent = {"msg_id": "m3", "msg_type": "apply_request"}
        msg = c.session.msg("apply_reply", {"status": "aborted"}, parent=parent)
        c._on_mux_reply([zmq.Frame(bytes(p)) for p in c.session.serialize(msg, ident=b"id")])
        return len(stock), future.result()

    stock, value = asyncio.run(run())
    assert stock == 1  # the stock path got it
    assert type(value).__name__ == "TaskAborted"
