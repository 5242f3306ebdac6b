"""Server lifecycle: restart on the same data dir, clean shutdown, idempotent submit."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from tests.support import ServerProcess, ipyparallel_processes_of, pid_alive
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .helpers import TERMINAL, get, submit, wait_state, wait_terminal


def test_killed_server_restarts_with_its_records_and_tokens_and_fails_running_tasks(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data, engines=2)
    try:
        first.start()
        with grpc.insecure_channel(first.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            token = stub.ListTasks(spb.ListTasksRequest(), timeout=10).resume_token
            done = submit(stub, "demo.echo", args={"value": "kept"})
            wait_terminal(stub, done.name)
            running = submit(stub, "demo.sleep", args={"seconds": 60})
            wait_state(stub, running.name, {tpb.TASK_STATE_RUNNING})
            before = [r.task_event.revision for r in _drain(stub, token)]
        first.kill()  # SIGKILL: no shutdown code runs
        second = ServerProcess(data, port=first.port, engines=2)
        with second, grpc.insecure_channel(second.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            kept = get(stub, done.name)
            assert (kept.state, kept.output) == (tpb.TASK_STATE_SUCCEEDED, kept.output)
            assert (
                stub.GetTask(
                    spb.GetTaskRequest(name=done.name), timeout=10
                ).task.result.string_value
                == "kept"
            )
            failed = get(stub, running.name)
            assert failed.state == tpb.TASK_STATE_FAILED
            assert failed.error.reason == "CONTROLLER_RESTARTED"
            # A token issued before the restart still resumes, and the stream shows the failure.
            after = _drain(stub, token)
            revisions = [r.task_event.revision for r in after]
            assert revisions[: len(before)] == before
            assert any(
                r.task_event.task.name == running.name
                and r.task_event.task.state == tpb.TASK_STATE_FAILED
                for r in after
            )
            # And it still runs new work.
            new = submit(stub, "demo.echo", args={"value": 2})
            assert wait_terminal(stub, new.name).state == tpb.TASK_STATE_SUCCEEDED
    finally:
        first.kill_leftovers()


def _drain(stub, token: str) -> list[spb.StreamTaskStatusResponse]:  # type: ignore[no-untyped-def]
    """Every event after ``token`` up to the newest one, then stop."""
    out = []
    call = stub.StreamTaskStatus(
        spb.StreamTaskStatusRequest(resume_token=token, checkpoint_interval=_sec(0.2)), timeout=30
    )
    for resp in call:
        if resp.HasField("checkpoint"):
            call.cancel()
            break
        out.append(resp)
    return out


def _sec(x: float):  # type: ignore[no-untyped-def]
    from .helpers import seconds

    return seconds(x)


def test_sigterm_shuts_down_gracefully_within_ten_seconds_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, engines=2)
    server.start()
    pids = [p.pid for p in server.children]
    assert pids, "the server should have started cluster processes"
    with grpc.insecure_channel(server.address) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        task = submit(stub, "demo.sleep", args={"seconds": 60})
        wait_state(stub, task.name, {tpb.TASK_STATE_RUNNING})
        stream = stub.StreamTaskStatus(spb.StreamTaskStatusRequest())
        t0 = time.monotonic()
        code = server.stop(timeout=15)
        elapsed = time.monotonic() - t0
        try:
            for _ in stream:
                pass
            ended = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            ended = exc.code()
    assert code == 0
    assert elapsed < 10, f"shutdown took {elapsed:.1f}s"
    assert ended == grpc.StatusCode.UNAVAILABLE
    # The server exits only once every process of its cluster is gone: a supervisor that
    # starts it again at once does not race the old engines.
    assert [p for p in pids if pid_alive(p)] == []
    assert ipyparallel_processes_of(data) == []


def test_pending_tasks_survive_a_restart_and_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, engines=1)
    try:
        server.start()
        with grpc.insecure_channel(server.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            blocker = submit(stub, "demo.sleep", args={"seconds": 60})
            wait_state(stub, blocker.name, {tpb.TASK_STATE_RUNNING})
            queued = [submit(stub, "demo.echo", args={"value": i}) for i in range(3)]
        server.stop()
        server = ServerProcess(data, port=server.port, engines=1)
        server.start()
        with grpc.insecure_channel(server.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            for q in queued:
                assert wait_terminal(stub, q.name).state == tpb.TASK_STATE_SUCCEEDED
            assert get(stub, blocker.name).state in TERMINAL
    finally:
        server.stop()
        server.kill_leftovers()


def test_shutdown_with_a_task_that_ignores_signals_still_exits_within_ten_seconds(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, engines=1)
    try:
        server.start()
        pids = [p.pid for p in server.children]
        with grpc.insecure_channel(server.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            task = submit(stub, "demo.c_call", args={"seconds": 60})
            wait_state(stub, task.name, {tpb.TASK_STATE_RUNNING})
            time.sleep(0.3)
        t0 = time.monotonic()
        assert server.stop(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        assert [p for p in pids if pid_alive(p)] == []
        # The record says what happened: interrupted by the shutdown, not lost in a crash.
        server = ServerProcess(data, port=server.port, engines=1)
        server.start()
        with grpc.insecure_channel(server.address) as ch:
            ended = get(task_service_pb2_grpc.TaskServiceStub(ch), task.name)
        assert ended.state == tpb.TASK_STATE_INTERRUPTED
        assert ended.interrupt.cause == tpb.INTERRUPT_CAUSE_SHUTDOWN
        assert ended.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGKILL
    finally:
        server.stop()
        server.kill_leftovers()
