"""What the fault tests share: health, process lookups, streams of every event."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy; a TimeoutError names ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def cluster_processes(server_pid: int) -> list[psutil.Process]:
    """The server's ipyparallel processes: hub, engines, nannies (its descendants)."""
    found = []
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if "ipyparallel" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def hub_process(server_pid: int) -> psutil.Process:
    found = [
        p
        for p in cluster_processes(server_pid)
        if "ipyparallel_hub" in " ".join(p.cmdline()) and p.ppid() == server_pid
    ]
    assert len(found) == 1, found
    return found[0]


def nanny_of(engine_pid: int) -> psutil.Process:
    nannies = [c for c in psutil.Process(engine_pid).children() if "nanny" in " ".join(c.cmdline())]
    assert len(nannies) == 1, nannies
    return nannies[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class EventRecorder:
    """An unfiltered StreamTaskStatus on a thread: every event, in order."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = task_service_pb2_grpc.TaskServiceStub(channel)
        self.events: list[spb.TaskEvent] = []
        self._call: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _read(self) -> None:
        self._call = self._stub.StreamTaskStatus(
            spb.StreamTaskStatusRequest(send_initial_state=True)
        )
        self._ready.set()
        try:
            for response in self._call:
                if response.HasField("task_event"):
                    self.events.append(response.task_event)
        except grpc.RpcError:
            pass

    def of_task(self, name: str) -> list[spb.TaskEvent]:
        return [e for e in self.events if e.task.name == name]

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._thread.join(5)


def kill_pid(pid: int, sig: int) -> None:
    os.kill(pid, sig)
