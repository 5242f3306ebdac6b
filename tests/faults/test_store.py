"""The store fails under tether (a full disk, a kill -9, a corrupt file): nothing is lost,
nothing refused runs, and tether serves again when it can."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import uuid
from pathlib import Path

import grpc
import pytest

from tests.integration.helpers import error_info, get, struct, submit, wait_terminal
from tests.support import FAST_SERVER_ARGS, SERVER_BIN, ServerProcess, free_port
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .support import NOT_SERVING, SERVING, health, wait_until


def _fill(disk: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (256 * 1024, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def _all_tasks(stub: task_service_pb2_grpc.TaskServiceStub) -> list[tpb.Task]:
    found: list[tpb.Task] = []
    token = ""
    while True:
        page = stub.ListTasks(spb.ListTasksRequest(page_size=500, page_token=token), timeout=30)
        found.extend(page.tasks)
        token = page.next_page_token
        if not token:
            return found


def _submit(stub: task_service_pb2_grpc.TaskServiceStub, request_id: str) -> tpb.Task:
    req = spb.SubmitTaskRequest(
        task="demo.echo", args=struct({"value": request_id}), request_id=request_id
    )
    return stub.SubmitTask(req, timeout=30).task


def test_a_full_disk_refuses_work_without_trace_keeps_accepted_work_and_recovers(
    small_disk: Path,
) -> None:
    data_dir = small_disk / "data"
    server = ServerProcess(data_dir, engines=2, extra_args=FAST_SERVER_ARGS)
    filler: Path | None = None
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            accepted_before = submit(tasks, "demo.sleep", args={"seconds": 2})
            filler = _fill(small_disk)

            accepted: list[str] = []
            refused: list[str] = []
            for _ in range(3000):
                request_id = uuid.uuid4().hex
                try:
                    accepted.append(_submit(tasks, request_id).name)
                except grpc.RpcError as exc:
                    code, reason, _meta, _fields = error_info(exc)
                    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
                    refused.append(request_id)
                    if len(refused) >= 20:
                        break
            assert refused, "the full disk never refused a write"
            assert health(channel) == NOT_SERVING

            # The task accepted before the disk filled up still ends, and is kept.
            ended = wait_terminal(tasks, accepted_before.name, timeout=30)
            assert ended.state == tpb.TASK_STATE_SUCCEEDED

            filler.unlink()
            filler = None
            wait_until(lambda: health(channel) == SERVING, 30, "SERVING once there is room")
            for name in accepted:
                assert wait_terminal(tasks, name, timeout=60).state == tpb.TASK_STATE_SUCCEEDED
            listed = {t.name for t in _all_tasks(tasks)}
            assert listed == {accepted_before.name, *accepted}

            # A refused request left no trace: its request_id is new to the server.
            again = _submit(tasks, refused[0])
            assert again.name not in listed
            assert wait_terminal(tasks, again.name).result.string_value == refused[0]

        server.stop()
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            after = {t.name: t for t in _all_tasks(tasks)}
            assert set(after) == {accepted_before.name, *accepted, again.name}
            assert after[accepted_before.name].state == tpb.TASK_STATE_SUCCEEDED
            assert all(t.state == tpb.TASK_STATE_SUCCEEDED for t in after.values())
    finally:
        if filler is not None:
            with contextlib.suppress(OSError):
                filler.unlink()
        try:
            server.stop()
        finally:
            server.kill_leftovers()


def test_every_acknowledged_submit_survives_a_server_kill_during_a_burst(data_dir: Path) -> None:
    server = ServerProcess(data_dir, engines=2, extra_args=FAST_SERVER_ARGS)
    acked: list[str] = []
    unanswered = 0
    lock = threading.Lock()
    stop = threading.Event()
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)

            def burst() -> None:
                nonlocal unanswered
                while not stop.is_set():
                    try:
                        name = _submit(tasks, uuid.uuid4().hex).name
                    except grpc.RpcError as exc:
                        # The server died under the call: unknown whether it was recorded.
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        with lock:
                            unanswered += 1
                        return
                    with lock:
                        acked.append(name)

            threads = [threading.Thread(target=burst) for _ in range(8)]
            for t in threads:
                t.start()
            wait_until(lambda: len(acked) >= 200, 60, "200 acknowledged submits")
            server.kill()
            stop.set()
            for t in threads:
                t.join(30)
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            listed = {t.name for t in _all_tasks(tasks)}
            missing = set(acked) - listed
            assert not missing, f"{len(missing)} acknowledged tasks lost"
            # Only calls that never got an answer may have been recorded besides.
            assert len(listed) <= len(acked) + unanswered
            for name in acked[-5:]:
                assert get(tasks, name).name == name
    finally:
        stop.set()
        try:
            server.stop()
        finally:
            server.kill_leftovers()


def _start_fails(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run tether-server on ``data_dir``; it must stop by itself (it cannot start)."""
    return subprocess.run(
        [str(SERVER_BIN), "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "content",
    [b"this is not a database" * 100, b"SQLite format 3\0" + os.urandom(8192)],
    ids=["garbage", "broken-sqlite"],
)
def test_a_corrupt_store_stops_the_start_with_a_clear_error_and_is_not_touched(
    data_dir: Path, content: bytes
) -> None:
    data_dir.mkdir(parents=True)
    store = data_dir / "tether.sqlite3"
    store.write_bytes(content)
    out = _start_fails(data_dir)
    assert out.returncode != 0
    assert "unreadable or corrupt" in out.stderr, out.stderr
    assert store.read_bytes() == content
    assert not (data_dir / "ipython").exists()  # no cluster was started


def test_an_unreadable_store_stops_the_start_with_a_clear_error(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    store = data_dir / "tether.sqlite3"
    store.mkdir()  # a directory where the file should be: it cannot be opened
    out = _start_fails(data_dir)
    assert out.returncode != 0
    assert "store" in out.stderr and str(store) in out.stderr, out.stderr
    assert store.is_dir()


def test_a_database_locked_by_another_process_refuses_submits_until_it_is_free(
    data_dir: Path,
) -> None:
    import sqlite3

    server = ServerProcess(data_dir, engines=1, extra_args=FAST_SERVER_ARGS)
    try:
        server.start()
        with grpc.insecure_channel(server.address) as channel:
            tasks = task_service_pb2_grpc.TaskServiceStub(channel)
            intruder = sqlite3.connect(data_dir / "tether.sqlite3", isolation_level=None)
            intruder.execute("BEGIN IMMEDIATE")  # holds the write lock past the busy timeout
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    _submit(tasks, "while-locked")
                code, reason, _meta, _fields = error_info(refused.value)
                assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
                assert health(channel) == NOT_SERVING
            finally:
                intruder.execute("ROLLBACK")
                intruder.close()
            wait_until(lambda: health(channel) == SERVING, 30, "SERVING once the lock is gone")
            assert _all_tasks(tasks) == []
            again = _submit(tasks, "while-locked")
            assert wait_terminal(tasks, again.name).state == tpb.TASK_STATE_SUCCEEDED
    finally:
        try:
            server.stop()
        finally:
            server.kill_leftovers()
