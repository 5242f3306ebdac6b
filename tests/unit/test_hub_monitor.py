"""The embedded hub's lean monitor handlers keep the bookkeeping the stock ones keep."""

from __future__ import annotations

import logging
from typing import Any

from ipyparallel.controller.dictdb import DictDB, NoDB
from jupyter_client.session import Session

from tether_server.cluster import hub_monitor

ENGINE = b"engine-uuid-0"
CLIENT = b"client-uuid"


class FakeHub:
    """The attributes of ipyparallel's Hub the handlers read and write."""

    def __init__(self, db: Any, key: bytes = b"secret") -> None:
        self.session = Session(key=key)
        self.db = db
        self.by_ident = {ENGINE: 0}
        self.pending: set[str] = set()
        self.queues: dict[int, list[str]] = {0: []}
        self.completed: dict[int, list[str]] = {0: []}
        self.all_completed: set[str] = set()
        self.log = logging.getLogger("test-hub")
        self.stock: list[tuple[str, Any]] = []

    def save_queue_request(self, idents: Any, msg: Any) -> None:
        self.stock.append(("request", msg))

    def save_queue_result(self, idents: Any, msg: Any) -> None:
        self.stock.append(("result", msg))

    def monitor_iopub_message(self, topics: Any, msg: Any) -> None:
        self.stock.append(("iopub", msg))


hub_monitor.install(FakeHub, NoDB)


def frames(session: Session, msg: dict[str, Any], idents: list[bytes]) -> tuple[Any, Any]:
    wire = session.serialize(msg, ident=idents)
    return session.feed_identities(wire)


def request_and_reply(session: Session) -> tuple[dict[str, Any], dict[str, Any]]:
    request = session.msg("apply_request", {})
    reply = session.msg("apply_reply", {"status": "ok"}, parent=request)
    return request, reply


def test_a_request_then_its_reply_move_through_pending_queue_completed() -> None:
    hub = FakeHub(NoDB())
    request, reply = request_and_reply(hub.session)
    msg_id = request["header"]["msg_id"]
    hub.save_queue_request(*frames(hub.session, request, [ENGINE, CLIENT]))
    assert hub.pending == {msg_id} and hub.queues[0] == [msg_id]
    hub.save_queue_result(*frames(hub.session, reply, [CLIENT, ENGINE]))
    assert hub.pending == set() and hub.queues[0] == []
    assert hub.completed[0] == [msg_id] and msg_id in hub.all_completed
    assert hub.stock == []


def test_a_forged_signature_goes_to_the_stock_handler_and_is_not_counted() -> None:
    hub = FakeHub(NoDB())
    forger = Session(key=b"other key")
    request, _reply = request_and_reply(forger)
    hub.save_queue_request(*frames(forger, request, [ENGINE, CLIENT]))
    assert hub.pending == set() and hub.queues[0] == []
    assert [kind for kind, _ in hub.stock] == ["request"]


def test_an_unknown_engine_and_a_database_take_the_stock_path() -> None:
    hub = FakeHub(NoDB())
    request, _ = request_and_reply(hub.session)
    hub.save_queue_request(*frames(hub.session, request, [b"nobody", CLIENT]))
    with_db = FakeHub(DictDB())
    request, reply = request_and_reply(with_db.session)
    with_db.save_queue_request(*frames(with_db.session, request, [ENGINE, CLIENT]))
    with_db.save_queue_result(*frames(with_db.session, reply, [CLIENT, ENGINE]))
    with_db.monitor_iopub_message([b"iopub"], frames(with_db.session, reply, [b"t"])[1])
    assert [kind for kind, _ in hub.stock] == ["request"] and hub.pending == set()
    assert [kind for kind, _ in with_db.stock] == ["request", "result", "iopub"]


def test_a_late_reply_of_a_finished_request_changes_nothing() -> None:
    hub = FakeHub(NoDB())
    request, reply = request_and_reply(hub.session)
    hub.save_queue_request(*frames(hub.session, request, [ENGINE, CLIENT]))
    hub.save_queue_result(*frames(hub.session, reply, [CLIENT, ENGINE]))
    hub.save_queue_result(*frames(hub.session, reply, [CLIENT, ENGINE]))
    assert hub.completed[0] == [request["header"]["msg_id"]] and hub.pending == set()


def test_iopub_without_a_database_reaches_the_stock_handler_only_for_shutdown() -> None:
    hub = FakeHub(NoDB())
    status = hub.session.msg("status", {"execution_state": "idle"})
    shutdown = hub.session.msg("shutdown_reply", {"status": "ok"})
    hub.monitor_iopub_message([b"iopub"], frames(hub.session, status, [b"engine.0.status"])[1])
    hub.monitor_iopub_message([b"iopub"], frames(hub.session, shutdown, [b"engine.0.x"])[1])
    assert [kind for kind, _ in hub.stock] == ["iopub"]
    assert hub.stock[0][1][1] == frames(hub.session, shutdown, [b"t"])[1][1]
