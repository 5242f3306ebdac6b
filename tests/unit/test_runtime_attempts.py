"""Exact signals and withdrawals on the engine side (runtime/attempts.py, guard.send_to).

These run the runtime in this process's main thread, as an engine does, with real
signals: the control thread of an engine is played by a ``threading.Timer``.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from typing import Any

import pytest

import tether_server.tasks.demo  # noqa: F401  (registers the demo tasks)
from tether_server.runtime.attempts import BOOK, AttemptBook
from tether_server.runtime.engine import run_task
from tether_server.runtime.guard import GUARD, TaskSignals


def spec(task_id: str, name: str, **args: Any) -> dict[str, Any]:
    return {"task_id": task_id, "attempt": 1, "task": name, "args": args}


def later(seconds: float, function: Any, *args: Any) -> threading.Timer:
    timer = threading.Timer(seconds, function, args)
    timer.start()
    return timer


def test_a_signal_for_the_armed_attempt_interrupts_it(guard: None) -> None:
    task_id = uuid.uuid4().hex
    answers: list[str] = []
    timer = later(0.2, lambda: answers.append(BOOK.signal((task_id, 1), "SIGINT")))
    started = time.monotonic()
    outcome = run_task(spec(task_id, "demo.sleep", seconds=10))
    timer.join()
    assert answers == ["delivered"]
    assert (outcome["status"], outcome["stage"]) == ("interrupted", "SIGINT")
    assert time.monotonic() - started < 5


def test_a_signal_for_another_attempt_is_held_for_it_not_delivered(guard: None) -> None:
    running, other = uuid.uuid4().hex, uuid.uuid4().hex
    answers: list[str] = []
    timer = later(0.1, lambda: answers.append(BOOK.signal((other, 1), "SIGTERM")))
    outcome = run_task(spec(running, "demo.sleep", seconds=0.5))
    timer.join()
    assert answers == ["held"]  # ``other`` has not begun: it gets it when it does
    assert outcome["status"] == "succeeded"
    assert BOOK.signal((running, 1), "SIGINT") == "missed"  # it ended: nothing is armed for it


def test_a_signal_held_for_an_attempt_that_had_not_begun_interrupts_it_at_once(
    guard: None,
) -> None:
    task_id = uuid.uuid4().hex
    assert BOOK.signal((task_id, 1), "SIGINT") == "held"
    started = time.monotonic()
    outcome = run_task(spec(task_id, "demo.sleep", seconds=10))
    assert (outcome["status"], outcome["stage"]) == ("interrupted", "SIGINT")
    assert time.monotonic() - started < 5
    assert outcome["error_type"] == "KeyboardInterrupt"
    # Raised once: the next attempt of the same task owes nothing.
    assert run_task(dict(spec(task_id, "demo.echo", value=1), attempt=2))["status"] == "succeeded"


@pytest.mark.parametrize("order", [("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT")])
def test_a_held_sigterm_outranks_a_held_sigint(guard: None, order: tuple[str, str]) -> None:
    task_id = uuid.uuid4().hex
    for name in order:
        assert BOOK.signal((task_id, 1), name) == "held"
    outcome = run_task(spec(task_id, "demo.sleep", seconds=10))
    assert (outcome["status"], outcome["stage"]) == ("interrupted", "SIGTERM")


def test_a_withdrawn_attempt_drops_the_signal_held_for_it(guard: None) -> None:
    task_id = uuid.uuid4().hex
    assert BOOK.signal((task_id, 1), "SIGINT") == "held"
    assert BOOK.withdraw((task_id, 1))
    assert run_task(spec(task_id, "demo.echo", value=1))["status"] == "not_started"
    assert BOOK.signal((task_id, 1), "SIGINT") == "missed"  # it had its turn


def test_a_signal_handled_after_its_attempt_ended_never_reaches_the_next(guard: None) -> None:
    first, second = TaskSignals(), TaskSignals()
    late = GUARD.late_signals
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        GUARD.arm(first)
        GUARD.send_to(first, signal.SIGINT)  # pending: the main thread blocks it
        GUARD.disarm()
        GUARD.arm(second)  # the queued attempt starts before the handler runs
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # the handler runs here
    time.sleep(0.01)
    GUARD.disarm()
    assert GUARD.late_signals == late + 1
    assert second.sigints == 0 and not second.interrupt_owed


def test_a_withdrawn_attempt_does_not_start(guard: None) -> None:
    task_id = uuid.uuid4().hex
    assert BOOK.withdraw((task_id, 1))
    outcome = run_task(spec(task_id, "demo.echo", value=1))
    assert outcome["status"] == "not_started"
    assert "withdrawn" in outcome["error_message"]
    assert not BOOK.withdraw((task_id, 1))  # it has had its turn


def test_an_attempt_that_began_cannot_be_withdrawn(guard: None) -> None:
    task_id = uuid.uuid4().hex
    answers: list[bool] = []
    timer = later(0.1, lambda: answers.append(BOOK.withdraw((task_id, 1))))
    outcome = run_task(spec(task_id, "demo.sleep", seconds=0.4))
    timer.join()
    assert answers == [False]
    assert outcome["status"] == "succeeded"


def test_a_draining_engine_starts_nothing_more() -> None:
    book = AttemptBook()
    assert book.begin(("a", 1), TaskSignals(), None) == ""
    book.end(("a", 1))
    book.drain("the engine is being recycled: 300 MB held")
    assert book.begin(("b", 1), TaskSignals(), None) == "the engine is being recycled: 300 MB held"
    assert book.withdraw(("b", 1))  # it never began
