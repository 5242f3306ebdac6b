"""Small helpers over the generated stubs, shared by the integration tests."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support import FAST_GRACE, REPO, ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

TERMINAL = {
    tpb.TASK_STATE_SUCCEEDED,
    tpb.TASK_STATE_FAILED,
    tpb.TASK_STATE_INTERRUPTED,
    tpb.TASK_STATE_TIMED_OUT,
    tpb.TASK_STATE_CANCELLED,
}


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def seconds(x: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(x * 1e9))
    return d


def submit(stub: task_service_pb2_grpc.TaskServiceStub, task: str, **kwargs: Any) -> tpb.Task:
    args = kwargs.pop("args", {})
    req = spb.SubmitTaskRequest(task=task, args=struct(args), **kwargs)
    return stub.SubmitTask(req, timeout=10).task


def get(stub: task_service_pb2_grpc.TaskServiceStub, name: str) -> tpb.Task:
    return stub.GetTask(spb.GetTaskRequest(name=name), timeout=10).task


def full_task(stub: task_service_pb2_grpc.TaskServiceStub, name: str) -> tpb.Task:
    """GetTask in the FULL view (result and traceback included)."""
    request = spb.GetTaskRequest(name=name, view=tpb.TASK_VIEW_FULL)
    return stub.GetTask(request, timeout=10).task


def result_of(task: tpb.Task) -> dict[str, Any]:
    """A task's result as a dict (for tasks that return one, like llm.generate)."""
    result = json_format.MessageToDict(task.result)
    assert isinstance(result, dict), task
    return result


def wait_state(
    stub: task_service_pb2_grpc.TaskServiceStub,
    name: str,
    states: AbstractSet[int],
    timeout: float = 30.0,
) -> tpb.Task:
    deadline = time.monotonic() + timeout
    while True:
        task = get(stub, name)
        if task.state in states:
            return task
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} still {tpb.TaskState.Name(task.state)} after {timeout}s")
        time.sleep(0.02)


def wait_in_c_call(
    stub: task_service_pb2_grpc.TaskServiceStub, name: str, timeout: float = 30.0
) -> tpb.Task:
    """Wait until a ``demo.c_call`` task is inside its C call (its progress report says so).

    RUNNING means dispatched: a signal that reaches the engine before the attempt begins
    is raised as it begins, before the call blocks signals, and ends it at SIGINT."""
    deadline = time.monotonic() + timeout
    while True:
        task = get(stub, name)
        if task.progress.message == "in the C call":
            return task
        if task.state in TERMINAL or time.monotonic() > deadline:
            raise TimeoutError(f"{name} not in its C call: {tpb.TaskState.Name(task.state)}")
        time.sleep(0.02)


def wait_terminal(
    stub: task_service_pb2_grpc.TaskServiceStub, name: str, timeout: float = 30.0
) -> tpb.Task:
    return wait_state(stub, name, TERMINAL, timeout)


def error_info(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str], list[str]]:
    """(code, ErrorInfo.reason, ErrorInfo.metadata, BadRequest fields) of a failed call."""
    status = rpc_status.from_call(exc)
    reason, metadata, fields = "", {}, []
    assert status is not None, f"no rich status on {exc}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "tether.dev"
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return exc.code(), reason, metadata, fields


def stream_token(stub: task_service_pb2_grpc.TaskServiceStub) -> str:
    """A resume token for "now": a stream from it replays every later event."""
    return stub.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10).resume_token


class TaskStream:
    """One task's ``StreamTaskStatus``, read on a thread; each event kept with its arrival time.

    Give ``resume_token`` (from :func:`stream_token`, taken before the submit) to see every
    event of the task from its first; without it the stream starts with a snapshot.
    """

    def __init__(
        self,
        stub: task_service_pb2_grpc.TaskServiceStub,
        name: str,
        *,
        resume_token: str = "",
        exclude_progress: bool = False,
        timeout: float = 120.0,
    ) -> None:
        request = spb.StreamTaskStatusRequest(
            name=name, resume_token=resume_token, exclude_progress=exclude_progress
        )
        self.events: list[tuple[float, spb.TaskEvent]] = []
        self.error: grpc.RpcError | None = None
        self._changed = threading.Condition()
        self._ended = False
        self._call = stub.StreamTaskStatus(request, timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                if response.HasField("task_event"):
                    with self._changed:
                        self.events.append((time.monotonic(), response.task_event))
                        self._changed.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def wait_for(
        self, predicate: Callable[[spb.TaskEvent], bool], timeout: float = 30.0, count: int = 1
    ) -> tuple[float, spb.TaskEvent]:
        """The ``count``-th event (and its arrival time) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [(arrived, e) for arrived, e in self.events if predicate(e)]
                if len(matches) >= count:
                    return matches[count - 1]
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    raise TimeoutError(
                        f"no such event in {len(self.events)} events"
                        f" (stream ended: {self._ended}, error: {self.error})"
                    )
                self._changed.wait(left)

    def terminal(self, timeout: float = 30.0) -> tuple[float, spb.TaskEvent]:
        """The terminal STATE_CHANGED event and its arrival time."""
        return self.wait_for(
            lambda e: e.type == spb.TASK_EVENT_TYPE_STATE_CHANGED and e.task.state in TERMINAL,
            timeout,
        )

    def of_type(self, kind: int) -> list[tuple[float, spb.TaskEvent]]:
        with self._changed:
            return [(arrived, e) for arrived, e in self.events if e.type == kind]

    def close(self) -> None:
        self._call.cancel()
        self._reader.join(10)

    def __enter__(self) -> TaskStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def engines(cluster: cluster_service_pb2_grpc.ClusterServiceStub) -> list[cpb.Engine]:
    """Every engine the server knows, LOST ones included."""
    return list(cluster.GetCluster(cpb.GetClusterRequest(), timeout=10).engines)


def usable_engines(cluster: cluster_service_pb2_grpc.ClusterServiceStub) -> list[cpb.Engine]:
    return [
        e for e in engines(cluster) if e.state in (cpb.ENGINE_STATE_IDLE, cpb.ENGINE_STATE_BUSY)
    ]


def wait_pool(
    cluster: cluster_service_pb2_grpc.ClusterServiceStub, size: int, timeout: float = 60.0
) -> list[cpb.Engine]:
    """Wait until ``size`` engines are IDLE (a full pool with nothing running); return them."""
    deadline = time.monotonic() + timeout
    while True:
        idle = [e for e in engines(cluster) if e.state == cpb.ENGINE_STATE_IDLE]
        if len(idle) >= size:
            return idle
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(idle)} of {size} engines idle after {timeout}s")
        time.sleep(0.05)


SINGLE_THREADED_TORCH = {"OMP_NUM_THREADS": "1"}
"""Engines that run torch share this machine's few cores: one thread each keeps the
per-token time steady (with a thread per core, two busy engines slow each other down
many times over)."""


@contextlib.contextmanager
def running_server_with_env(
    data_dir: Path, env: dict[str, str], **kwargs: Any
) -> Iterator[ServerProcess]:
    """A server (and its engines, replacements included) started with ``env`` added to ours.

    The repository root goes on ``PYTHONPATH`` too, so ``--task-module tests.…`` imports
    on the server and on its engines.
    """
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    server = ServerProcess(data_dir, **kwargs)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {**env, "PYTHONPATH": path}.items():
                patch.setenv(key, value)
            server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            server.kill_leftovers()


def llm_server(
    tmp_path_factory: pytest.TempPathFactory, name: str, *extra_args: str
) -> Iterator[ServerProcess]:
    """A fixture body: a two-engine server for torch tasks, in its own data dir ``name``.

    Short graces (``FAST_GRACE``) and one torch thread per engine
    (``SINGLE_THREADED_TORCH``); ``extra_args`` are the module's own flags.
    """
    data = tmp_path_factory.mktemp(name) / "data"
    with running_server_with_env(
        data, SINGLE_THREADED_TORCH, engines=2, extra_args=[*FAST_GRACE, *extra_args]
    ) as server:
        yield server
