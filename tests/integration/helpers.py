"""Small helpers over the generated stubs, shared by the integration tests."""

from __future__ import annotations

import time
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

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


def wait_state(
    stub: task_service_pb2_grpc.TaskServiceStub,
    name: str,
    states: set[int],
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


def wait_terminal(
    stub: task_service_pb2_grpc.TaskServiceStub, name: str, timeout: float = 30.0
) -> tpb.Task:
    return wait_state(stub, name, TERMINAL, timeout)


def error_info(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str], list[str]]:
    """(code, ErrorInfo.reason, ErrorInfo.metadata, BadRequest fields) of a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
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
