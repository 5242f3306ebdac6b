"""Several attempts in one request (runtime/batch.py): order, withdrawals, signals,
and the early reports that keep an ending from waiting for the rest of its batch.

Run in this process's main thread, as an engine does; a list stands in for IOPub."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import tether_server.tasks.demo  # noqa: F401  (registers the demo tasks)
from tether_server.runtime.attempts import BOOK
from tether_server.runtime.batch import EARLY_KIND, REPORT_AFTER, EarlyReports, run_tasks
from tether_server.runtime.context import MESSAGE_KEY


class Iopub:
    """The sink: what the attempts and the early reporter publish, in order."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, int, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        kind, task_id, attempt, payload = message[MESSAGE_KEY]
        with self.lock:
            self.messages.append((kind, task_id, attempt, payload))

    def early(self) -> list[str]:
        """Task ids whose outcome came early, in order."""
        with self.lock:
            return [o["task_id"] for m in self.messages if m[0] == EARLY_KIND for o in m[3]]


def spec(name: str, **args: Any) -> dict[str, Any]:
    return {"task_id": uuid.uuid4().hex, "attempt": 1, "task": name, "args": args}


def test_attempts_run_in_order_and_each_outcome_names_its_attempt(guard: None) -> None:
    specs = [spec("demo.echo", value=n) for n in range(4)]
    outcomes = run_tasks(specs, sink=Iopub())
    assert [(o["task_id"], o["attempt"], o["value"]) for o in outcomes] == [
        (s["task_id"], 1, n) for n, s in enumerate(specs)
    ]
    assert all(o["status"] == "succeeded" and o["seconds"] >= 0 for o in outcomes)


def test_a_withdrawn_attempt_in_a_batch_does_not_start_and_the_others_run(guard: None) -> None:
    specs = [spec("demo.echo", value=n) for n in range(3)]
    assert BOOK.withdraw((specs[1]["task_id"], 1))
    outcomes = run_tasks(specs, sink=Iopub())
    assert [o["status"] for o in outcomes] == ["succeeded", "not_started", "succeeded"]


def test_a_signal_for_one_attempt_of_a_batch_interrupts_only_that_one(guard: None) -> None:
    specs = [spec("demo.sleep", seconds=0.01), spec("demo.sleep", seconds=10), spec("demo.echo")]
    target = (specs[1]["task_id"], 1)
    timer = threading.Timer(0.3, BOOK.signal, (target, "SIGINT"))
    timer.start()
    outcomes = run_tasks(specs, sink=Iopub())
    timer.join()
    assert [o["status"] for o in outcomes] == ["succeeded", "interrupted", "succeeded"]


def test_an_ending_followed_by_a_long_attempt_is_published_early(guard: None) -> None:
    iopub = Iopub()
    specs = [spec("demo.echo", value=1), spec("demo.sleep", seconds=0.5), spec("demo.echo")]
    seen_while_running: list[list[str]] = []

    def look() -> None:
        seen_while_running.append(iopub.early())

    timer = threading.Timer(REPORT_AFTER + 0.2, look)
    timer.start()
    outcomes = run_tasks(specs, sink=iopub)
    timer.join()
    assert seen_while_running == [[specs[0]["task_id"]]]  # out while the long one ran
    assert iopub.early() == [specs[0]["task_id"]]  # the others went only with the reply
    assert len(outcomes) == 3  # the reply still carries every outcome


def test_a_quick_batch_publishes_nothing_early(guard: None) -> None:
    iopub = Iopub()
    run_tasks([spec("demo.echo", value=n) for n in range(8)], sink=iopub)
    time.sleep(REPORT_AFTER * 3)
    assert iopub.early() == []


def test_early_reports_wait_their_delay_and_are_published_once() -> None:
    iopub = Iopub()
    early = EarlyReports(iopub, after=0.05)
    early.hold({"task_id": "a", "attempt": 1})
    time.sleep(0.01)
    assert iopub.early() == []
    deadline = time.monotonic() + 2
    while not iopub.early() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert iopub.early() == ["a"]
    early.hold({"task_id": "b", "attempt": 1})
    early.settle()  # the reply took it
    time.sleep(0.1)
    assert iopub.early() == ["a"]
    assert early.published == 1
