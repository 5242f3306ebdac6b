"""The engine runtime on a real local ipyparallel cluster: signals, cleanup, reports.

One two-engine cluster serves the module (500 ms heartbeat, loopback only). Tasks go
through ``rc[eid].apply_async(run_task, spec)`` exactly as the controller sends them, and
signals through ``rc.send_signal`` (the nanny) or ``os.kill`` straight at the engine.
The cluster is stopped in the fixture's ``finally``; the fixture then checks that no
process it started is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipyparallel as ipp
import psutil
import pytest
import zmq
from ipyparallel.serialize import deserialize_object
from jupyter_client.session import Session

from tether_server.runtime import run_task, setup_engine

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
ENGINE_CONFIG: dict[str, Any] = {"task_modules": [], "tags": ["test"]}
LOAD_INTERVAL = 0.05
"""Seconds between an engine's load reports here: each names the attempt it has armed, so
a test can tell when a task is inside its body (the runtime sends no "started")."""


def engine_config(eid: int) -> dict[str, Any]:
    return {**ENGINE_CONFIG, "engine_id": eid, "load_interval": LOAD_INTERVAL}


# --------------------------------------------------------------------------- IOPub
class IOPubWatcher:
    """Every tether data message on the cluster's IOPub, seen by an independent SUB socket."""

    def __init__(self, rc: ipp.Client) -> None:
        cfg = rc._config
        self._session = Session(
            key=cfg["key"].encode(),
            signature_scheme=cfg["signature_scheme"],
            packer=cfg["pack"],
            unpacker=cfg["unpack"],
        )
        self._url = cfg["iopub"]
        self._messages: list[tuple[float, list[Any]]] = []
        self._armed: dict[int, tuple[str, int]] = {}  # engine -> attempt its last load named
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="iopub-watcher", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "IOPub watcher did not start"

    def _run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self._url)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                frames = sock.recv_multipart(copy=False)
                _, parts = self._session.feed_identities(frames, copy=False)
                msg = self._session.deserialize(parts, content=True, copy=False)
                if msg["header"]["msg_type"] != "data_message":
                    continue
                data, _ = deserialize_object(msg["buffers"])
                if isinstance(data, dict) and "tether" in data:
                    with self._lock:
                        self._note(data["tether"])
        finally:
            sock.close(0)
            context.term()

    def _note(self, message: list[Any]) -> None:
        if message[0] == "load":  # the engine's own report: what it has armed now
            load = message[3]
            self._armed[int(load["engine_id"])] = (load["task_id"], int(load["attempt"]))
        else:
            self._messages.append((time.monotonic(), message))

    def armed(self, eid: int) -> tuple[str, int] | None:
        """The attempt engine ``eid`` had armed at its last load report."""
        with self._lock:
            return self._armed.get(eid)

    def wait_armed(self, eid: int, task_id: str, timeout: float = 10.0) -> None:
        """Until engine ``eid`` reports that it runs ``task_id`` (armed, in its body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            armed = self.armed(eid)
            if armed is not None and armed[0] == task_id:
                return
            time.sleep(0.002)
        raise AssertionError(f"engine {eid} did not report task {task_id} within {timeout} s")

    def messages(self, task_id: str) -> list[list[Any]]:
        with self._lock:
            return [m for _, m in self._messages if m[1] == task_id]

    def wait_for(self, task_id: str, kind: str, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages(task_id):
                if message[0] == kind:
                    return message
            time.sleep(0.002)
        raise AssertionError(f"no {kind!r} message for task {task_id} within {timeout} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- cluster
@dataclass
class Harness:
    cluster: ipp.Cluster
    rc: ipp.Client
    watcher: IOPubWatcher
    engine_info: dict[int, dict[str, Any]]
    started_pids: set[int] = field(default_factory=set)

    def submit(self, eid: int, task: str, rss_tolerance_mb: int = 64, **args: Any) -> Submitted:
        task_id = uuid.uuid4().hex
        spec = {
            "task_id": task_id,
            "attempt": 0,
            "task": task,
            "args": args,
            "resume_state": None,
            "max_output_chars": 4096,
            "rss_tolerance_bytes": rss_tolerance_mb * MiB,
            "gpu_tolerance_bytes": 0,
        }
        return Submitted(task_id, self.rc[eid].apply_async(run_task, spec))

    def run(self, eid: int, task: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        outcome: dict[str, Any] = self.submit(eid, task, **args).ar.get(timeout=timeout)
        return outcome

    def engine_pid(self, eid: int) -> int:
        return int(self.engine_info[eid]["pid"])

    def assert_engine_healthy(self, eid: int) -> None:
        assert eid in self.rc.ids
        assert psutil.pid_exists(self.engine_pid(eid))
        outcome = self.run(eid, "demo.echo", timeout=10, value="still here")
        assert outcome["status"] == "succeeded"
        assert outcome["value"] == "still here"


@dataclass
class Submitted:
    task_id: str
    ar: Any


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    profile_dir = Path(tmp_path_factory.mktemp("ipp")) / "profile_tether"
    cluster = ipp.Cluster(
        n=2,
        profile_dir=str(profile_dir),
        controller_ip="127.0.0.1",
        controller_args=["--HeartMonitor.period=500"],
        delay=0,
        log_level=logging.WARNING,
    )
    rc: ipp.Client | None = None
    watcher: IOPubWatcher | None = None
    harness: Harness | None = None
    mine: set[int] = set()
    # Other fixtures' processes (a session server, its cluster) are descendants of
    # this test process too: only what appears from here on belongs to this cluster.
    others = _descendants()
    try:
        rc = cluster.start_and_connect_sync(n=2)
        rc.wait_for_engines(2, timeout=60)
        mine |= _descendants() - others
        info = [rc[eid].apply_sync(setup_engine, engine_config(eid)) for eid in rc.ids]
        watcher = IOPubWatcher(rc)
        harness = Harness(cluster, rc, watcher, dict(zip(rc.ids, info, strict=True)))
        _wait_for_watcher(harness)
        yield harness
    finally:
        mine |= _descendants() - others
        if harness is not None:
            mine |= harness.started_pids
        if watcher is not None:
            watcher.close()
        if rc is not None:
            rc.close()
        # The *_sync Cluster API runs without an event loop and can miss launcher
        # notifications (notes/ipyparallel.md §4.4), e.g. for the engine set a test
        # started and then SIGTERMed; whatever it leaves is killed here by pid.
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()
        left = _wait_gone(mine, timeout=15)
        for pid in left:  # ours, by pid: never leave a cluster behind
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        assert not _wait_gone(mine, timeout=5), "processes survived SIGKILL"


def _wait_for_watcher(harness: Harness) -> None:
    """A SUB socket misses what is published before it joins: wait until it sees messages."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(harness.watcher.armed(eid) is not None for eid in harness.rc.ids):
            return
        time.sleep(0.02)
    raise AssertionError("the IOPub watcher never saw a load report of each engine")


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _alive(pid)}
        time.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _interrupt_when_started(
    h: Harness, eid: int, submitted: Submitted, sig: int = signal.SIGINT, delay: float = 0.1
) -> float:
    """Wait until the engine reports the task armed, let it run ``delay`` s, signal via
    the nanny."""
    h.watcher.wait_armed(eid, submitted.task_id)
    time.sleep(delay)
    sent = time.monotonic()
    h.rc.send_signal(sig, targets=eid, block=True)
    return sent


# --------------------------------------------------------------------------- tests
def test_setup_engine_reports_pid_tags_and_demo_tasks(harness: Harness) -> None:
    for eid, info in harness.engine_info.items():
        assert info["pid"] == harness.rc[eid].apply_sync(os.getpid)
        assert info["tags"][0] == "test"
        assert {"demo.echo", "demo.sleep", "demo.c_call", "demo.spawn"} <= set(info["tasks"])
        assert re.fullmatch(r"3\.\d+\.\d+", info["python"])


def test_sigint_during_sleep_interrupts_task_runs_hook_and_keeps_engine(harness: Harness) -> None:
    latencies = []
    for _ in range(5):
        submitted = harness.submit(0, "demo.sleep", seconds=30)
        sent = _interrupt_when_started(harness, 0, submitted)
        outcome = submitted.ar.get(timeout=10)
        latencies.append(time.monotonic() - sent)
        assert outcome["status"] == "interrupted"
        assert outcome["stage"] == "SIGINT"
        assert outcome["error_type"] == "KeyboardInterrupt"
        assert outcome["hooks_run"] == 1
        assert "[on_interrupt] demo.sleep cleaned up\n" in outcome["output"]
        assert "time.sleep(seconds)" in outcome["traceback"]
        assert outcome["resources"]["reclaimed"] is True
        harness.assert_engine_healthy(0)
    print(
        f"\nSIGINT (send_signal, nanny ack included) -> outcome: median "
        f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
    )


def test_sigint_to_idle_engine_does_nothing(harness: Harness) -> None:
    pid = harness.engine_pid(1)
    for _ in range(50):
        harness.rc.send_signal(signal.SIGINT, targets=1, block=True)
        time.sleep(0.005)
    assert psutil.pid_exists(pid)
    harness.assert_engine_healthy(1)
    assert harness.rc[1].apply_sync(os.getpid) == pid


def test_interrupt_storm_never_loses_a_reply_or_the_engine(harness: Harness) -> None:
    pid = harness.engine_pid(0)
    submitted = []
    for i in range(300):
        if i % 2:
            submitted.append(harness.submit(0, "demo.echo", value=i))
        else:
            submitted.append(harness.submit(0, "demo.sleep", seconds=(i % 5 + 1) / 1000))
    stop = threading.Event()
    sent = [0]

    def shooter() -> None:
        while not stop.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
                sent[0] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=shooter, daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        deadline = started + 120
        while time.monotonic() < deadline and not all(s.ar.ready() for s in submitted):
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(5)
    elapsed = time.monotonic() - started
    pending = [s.task_id for s in submitted if not s.ar.ready()]
    assert not pending, f"{len(pending)} of 300 replies never came"
    statuses: dict[str, int] = {}
    for i, s in enumerate(submitted):
        outcome = s.ar.get(timeout=1)  # a RemoteError here (engine death...) fails the test
        statuses[outcome["status"]] = statuses.get(outcome["status"], 0) + 1
        assert outcome["status"] in ("succeeded", "interrupted"), outcome
        if outcome["status"] == "succeeded" and i % 2:
            assert outcome["value"] == i
        if outcome["status"] == "interrupted":
            assert outcome["stage"] == "SIGINT"
    print(f"\nstorm: {sent[0]} SIGINTs over {elapsed:.1f} s; outcomes {statuses}")
    assert psutil.pid_exists(pid)
    harness.assert_engine_healthy(0)
    assert harness.rc[0].apply_sync(os.getpid) == pid


def test_stubborn_task_survives_sigint_and_ends_on_sigterm(harness: Harness) -> None:
    submitted = harness.submit(1, "demo.stubborn", seconds=30)
    _interrupt_when_started(harness, 1, submitted)
    with pytest.raises(TimeoutError):
        submitted.ar.get(timeout=0.7)
    sent = time.monotonic()
    harness.rc.send_signal(signal.SIGTERM, targets=1, block=True)
    outcome = submitted.ar.get(timeout=10)
    assert time.monotonic() - sent < 2
    assert outcome["status"] == "interrupted"
    assert outcome["stage"] == "SIGTERM"
    assert outcome["error_type"] == "TaskTerminated"
    assert "[stubborn] ignoring KeyboardInterrupt" in outcome["output"]
    harness.assert_engine_healthy(1)


def test_c_call_defers_sigint_and_sigterm_until_it_returns(harness: Harness) -> None:
    submitted = harness.submit(1, "demo.c_call", seconds=2.5)
    started = time.monotonic()
    harness.watcher.wait_armed(1, submitted.task_id)
    time.sleep(0.3)
    harness.rc.send_signal(signal.SIGINT, targets=1, block=True)
    time.sleep(0.3)
    harness.rc.send_signal(signal.SIGTERM, targets=1, block=True)
    signalled = time.monotonic()
    with pytest.raises(TimeoutError):  # both signals wait for the C call
        submitted.ar.get(timeout=0.8)
    outcome = submitted.ar.get(timeout=20)
    took = time.monotonic() - started
    assert took >= 2.0, f"the C call ended after {took:.2f} s"
    assert time.monotonic() - signalled > 1.0
    assert outcome["status"] == "interrupted"
    assert outcome["stage"] in ("SIGINT", "SIGTERM")
    harness.assert_engine_healthy(1)


def test_interrupted_spawn_has_its_child_process_killed_and_counted(harness: Harness) -> None:
    submitted = harness.submit(0, "demo.spawn", seconds=30)
    chunk = harness.watcher.wait_for(submitted.task_id, "output")[3]
    match = re.search(r"child pid (\d+)", chunk)
    assert match, chunk
    child = int(match.group(1))
    harness.started_pids.add(child)
    assert _alive(child)
    harness.rc.send_signal(signal.SIGINT, targets=0, block=True)
    outcome = submitted.ar.get(timeout=10)
    assert outcome["status"] == "interrupted"
    assert outcome["resources"]["leftover_children"] == 1
    assert outcome["resources"]["reclaimed"] is True  # killed and gone: the engine is clean
    assert not psutil.pid_exists(child)
    nanny_survived = [p for p in psutil.Process(harness.engine_pid(0)).children()]
    assert nanny_survived, "the engine's nanny must never count as a leftover child"
    harness.assert_engine_healthy(0)


def test_leak_is_reported_as_not_reclaimed(harness: Harness) -> None:
    outcome = harness.run(1, "demo.leak", mb=200)
    assert outcome["status"] == "succeeded"
    resources = outcome["resources"]
    assert resources["rss_after_bytes"] - resources["rss_before_bytes"] >= 190 * MiB
    assert resources["reclaimed"] is False
    assert "NOT reclaimed" in resources["summary"]


def test_interrupted_task_gives_its_memory_back(harness: Harness) -> None:
    submitted = harness.submit(0, "demo.hold", mb=300, seconds=30)
    _interrupt_when_started(harness, 0, submitted, delay=0.5)
    outcome = submitted.ar.get(timeout=10)
    assert outcome["status"] == "interrupted"
    resources = outcome["resources"]
    assert resources["rss_after_bytes"] - resources["rss_before_bytes"] < 64 * MiB
    assert resources["reclaimed"] is True


def test_progress_and_output_messages_reach_the_client(harness: Harness) -> None:
    submitted = harness.submit(1, "demo.count", n=5, interval=0.02)
    outcome = submitted.ar.get(timeout=10)
    assert outcome["status"] == "succeeded"
    assert outcome["value"] == 5
    assert outcome["output"] == "".join(f"step {i}\n" for i in range(1, 6))
    # The reply and the reports travel on different sockets, and the watcher and the
    # client's own IOPub socket are two subscribers: wait for both to see the last one.
    last = ["output", submitted.task_id, 0, "step 5\n"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        len(harness.watcher.messages(submitted.task_id)) < 10
        or submitted.ar.data.get("tether") != last
    ):
        time.sleep(0.01)
    messages = harness.watcher.messages(submitted.task_id)
    assert len(messages) == 10  # nothing but the task's own reports
    progress = [m[3] for m in messages if m[0] == "progress"]
    output = [m[3] for m in messages if m[0] == "output"]
    assert progress == [[i / 5, f"step {i}/5"] for i in range(1, 6)]
    assert output == [f"step {i}\n" for i in range(1, 6)]
    assert messages[-1] == last
    assert submitted.ar.data["tether"] == last  # the client's data: the newest report


def test_checkpoints_are_published_and_resume_state_reaches_the_task(harness: Harness) -> None:
    submitted = harness.submit(0, "demo.resumable", n=3, interval=0.01)
    assert submitted.ar.get(timeout=10)["value"] == {"started_at": 0, "done": 3}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        checkpoints = [
            m[3] for m in harness.watcher.messages(submitted.task_id) if m[0] == "checkpoint"
        ]
        if len(checkpoints) == 3:
            break
        time.sleep(0.01)
    assert checkpoints == [{"done": 1}, {"done": 2}, {"done": 3}]
    spec = {
        "task_id": uuid.uuid4().hex,
        "attempt": 1,
        "task": "demo.resumable",
        "args": {"n": 4.0, "interval": 0.01},  # JSON numbers arrive as floats
        "resume_state": {"done": 2},
    }
    outcome = harness.rc[0].apply_async(run_task, spec).get(timeout=10)
    assert outcome["value"] == {"started_at": 2, "done": 4}


def test_failures_are_outcomes_not_remote_errors(harness: Harness) -> None:
    failed = harness.run(1, "demo.fail", message="boom")
    assert (failed["status"], failed["error_type"], failed["error_message"]) == (
        "failed",
        "RuntimeError",
        "boom",
    )
    assert "raise RuntimeError(message)" in failed["traceback"]
    assert "tether_server/runtime" not in failed["traceback"]
    unknown = harness.run(1, "demo.nope")
    assert (unknown["status"], unknown["error_type"]) == ("failed", "UnknownTask")
    bad_args = harness.run(1, "demo.sleep", seconds="soon")
    # The runtime's ArgumentError (a TypeError) names the argument that does not fit.
    assert (bad_args["status"], bad_args["error_type"]) == ("failed", "ArgumentError")
    assert "'seconds' must be a number" in bad_args["error_message"]


def test_sigterm_to_an_idle_engine_still_stops_it(harness: Harness) -> None:
    before = set(harness.rc.ids)
    harness.cluster.start_engines_sync(n=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(harness.rc.ids) <= len(before):
        time.sleep(0.05)
    new = sorted(set(harness.rc.ids) - before)
    assert len(new) == 1, harness.rc.ids
    eid = new[0]
    info = harness.rc[eid].apply_sync(setup_engine, engine_config(eid))
    harness.started_pids.add(info["pid"])
    harness.started_pids |= {p.pid for p in psutil.Process(info["pid"]).children(recursive=True)}
    assert harness.run(eid, "demo.echo", value=1)["status"] == "succeeded"
    harness.rc.send_signal(signal.SIGTERM, targets=eid, block=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (eid in harness.rc.ids or _alive(info["pid"])):
        time.sleep(0.05)
    assert eid not in harness.rc.ids
    assert not _alive(info["pid"])
