"""The runtime's listing of descendant processes: what a task left behind, found cheaply.

These run in the test process itself (Linux /proc), with real child processes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tether_server.runtime import resources

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(10)


def pids(snapshot: resources.Snapshot) -> set[int]:
    return {pid for pid, _started in snapshot.children}


def test_a_child_started_after_the_snapshot_is_killed_and_counted(
    children: list[subprocess.Popen[bytes]],
) -> None:
    before = resources.take_snapshot()
    children.append(subprocess.Popen(SLEEPER))
    assert resources.kill_new_children(before, grace=2.0) == (1, 0)
    assert children[0].wait(10) is not None


def test_a_child_that_outlives_sigkill_is_counted_and_the_memory_verdict_says_so(
    children: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process in uninterruptible sleep survives SIGKILL for a while. Stand-in: the
    waits after SIGTERM and after SIGKILL both still see the child alive."""
    before = resources.take_snapshot()
    children.append(subprocess.Popen(SLEEPER))

    def wait_procs(procs: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        return [], list(procs)  # it ignored SIGTERM, and was still there after SIGKILL

    monkeypatch.setattr(psutil, "wait_procs", wait_procs)
    cleanup = resources.kill_new_children(before, grace=0.1)
    monkeypatch.undo()
    assert cleanup == resources.ChildCleanup(killed=1, survived=1)
    after = resources.take_snapshot(children=False)
    report = resources.ResourceReport(
        before, after, cleanup.killed, 1 << 40, 1 << 40, surviving_children=cleanup.survived
    )
    assert not report.reclaimed and "1 survived SIGKILL" in report.summary()


def test_a_child_older_than_the_snapshot_is_listed_and_left_alone(
    children: list[subprocess.Popen[bytes]],
) -> None:
    children.append(subprocess.Popen(SLEEPER))
    before = resources.take_snapshot()
    assert children[0].pid in pids(before)
    assert resources.kill_new_children(before) == (0, 0)
    assert children[0].poll() is None


def test_the_listing_is_reused_while_no_pid_was_given_out(
    monkeypatch: pytest.MonkeyPatch, children: list[subprocess.Popen[bytes]]
) -> None:
    children.append(subprocess.Popen(SLEEPER))
    walks = 0
    walk = resources._descendants

    def counting() -> set[tuple[int, float]]:
        nonlocal walks
        walks += 1
        return walk()

    monkeypatch.setattr(resources, "_descendants", counting)
    monkeypatch.setattr(resources, "_last_pid", lambda: 4242)
    monkeypatch.setattr(resources, "_LISTED", None)
    first = resources.take_snapshot()
    second = resources.take_snapshot()
    assert walks == 1
    assert second.children == first.children and children[0].pid in pids(second)
    assert resources.kill_new_children(second) == (0, 0)  # the same newest pid: no walk at all
    assert walks == 1
    monkeypatch.setattr(resources, "_last_pid", lambda: 4243)  # something was created
    resources.take_snapshot()
    assert walks == 2


def test_children_of_a_service_thread_are_not_a_tasks_leftovers(
    children: list[subprocess.Popen[bytes]],
) -> None:
    ready = threading.Event()
    release = threading.Event()

    def service() -> None:
        resources.register_service_thread(threading.current_thread())
        children.append(subprocess.Popen(SLEEPER))
        ready.set()
        release.wait(30)

    thread = threading.Thread(target=service, daemon=True)
    before = resources.take_snapshot()
    thread.start()
    try:
        assert ready.wait(10)
        assert children[0].pid not in pids(resources.take_snapshot())
        assert resources.kill_new_children(before) == (0, 0)
        assert children[0].poll() is None
    finally:
        release.set()
        thread.join(10)


def test_start_time_tells_a_reused_pid_apart() -> None:
    proc = subprocess.Popen(SLEEPER)
    try:
        started = resources._start_time(proc.pid)
        assert started is not None and started == resources._start_time(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert resources._start_time(proc.pid) is None
