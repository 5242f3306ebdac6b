"""The bench's side of tether's gRPC API: raw generated stubs on grpc.aio.

The benches talk to the server with the generated stubs, not the typed client, so
that what they time is the API itself. :class:`EventTap` is the stream subscriber
most benches use: one ``StreamTaskStatus`` filter stream whose events are stamped
with ``perf_counter_ns`` the moment the reader gets them, kept per task, and handed
to whoever waits for a given state (even when the event came before the wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

TERMINAL = frozenset(
    {
        tpb.TASK_STATE_SUCCEEDED,
        tpb.TASK_STATE_FAILED,
        tpb.TASK_STATE_INTERRUPTED,
        tpb.TASK_STATE_TIMED_OUT,
        tpb.TASK_STATE_CANCELLED,
    }
)
STREAM_METHOD = "/tether.v1.TaskService/StreamTaskStatus"


def run_label() -> str:
    """A fresh label value that keeps one bench's tasks apart from every other's."""
    return uuid.uuid4().hex[:12]


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def grace(sigint: float, sigterm: float, sigkill: float = 5.0) -> tpb.GracePeriods:
    return tpb.GracePeriods(
        sigint=duration(sigint), sigterm=duration(sigterm), sigkill=duration(sigkill)
    )


def state_name(state: int) -> str:
    return tpb.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


def stage_name(stage: int) -> str:
    return tpb.EscalationStage.Name(stage).removeprefix("ESCALATION_STAGE_")  # type: ignore[arg-type]


class Tether:
    """A grpc.aio channel to one server and its two stubs."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.tasks = task_service_pb2_grpc.TaskServiceStub(self.channel)
        self.cluster = cluster_service_pb2_grpc.ClusterServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def submit(
        self,
        task: str,
        args: dict[str, Any] | None = None,
        *,
        labels: dict[str, str] | None = None,
        grace_periods: tpb.GracePeriods | None = None,
        priority: int = 0,
    ) -> tpb.Task:
        s = struct_pb2.Struct()
        s.update(args or {})
        request = spb.SubmitTaskRequest(task=task, args=s, labels=labels or {}, priority=priority)
        if grace_periods is not None:
            request.grace.CopyFrom(grace_periods)
        response = await self.tasks.SubmitTask(request, timeout=30)
        return response.task

    async def interrupt(self, name: str, reason: str = "bench") -> tpb.Task:
        response = await self.tasks.InterruptTask(
            spb.InterruptTaskRequest(name=name, reason=reason), timeout=30
        )
        return response.task

    async def get(self, name: str) -> tpb.Task:
        response = await self.tasks.GetTask(spb.GetTaskRequest(name=name), timeout=30)
        return response.task

    async def engines(self) -> list[cpb.Engine]:
        response = await self.cluster.GetCluster(cpb.GetClusterRequest(), timeout=30)
        return list(response.engines)

    async def wait_idle_engines(self, n: int, timeout: float = 90.0) -> list[cpb.Engine]:
        """Wait until ``n`` engines are IDLE and nothing is queued or running."""
        deadline = time.monotonic() + timeout
        while True:
            response = await self.cluster.GetCluster(cpb.GetClusterRequest(), timeout=30)
            idle = [e for e in response.engines if e.state == cpb.ENGINE_STATE_IDLE]
            quiet = response.pending_tasks == 0 and response.running_tasks == 0
            if len(idle) >= n and quiet:
                return idle
            if time.monotonic() > deadline:
                states = [(e.id, cpb.EngineState.Name(e.state)) for e in response.engines]
                raise TimeoutError(f"{n} idle engines not reached in {timeout}s: {states}")
            await asyncio.sleep(0.05)


@dataclass(frozen=True, slots=True)
class Seen:
    """One event as the tap received it."""

    recv_ns: int
    """``perf_counter_ns`` at receipt (for intervals measured in this process)."""
    recv_wall_ns: int
    """``time_ns`` at receipt (to compare with the server's ``event_time``)."""
    type: int
    state: int
    revision: int
    event_time_ns: int
    stage: int
    chunk: str
    engine_id: int | None
    attempt: int = 0


Predicate = Callable[[Seen], bool]


def in_state(*states: int) -> Predicate:
    return lambda seen: seen.type != spb.TASK_EVENT_TYPE_SNAPSHOT and seen.state in states


@dataclass(slots=True)
class _Waiter:
    predicate: Predicate
    future: asyncio.Future[Seen]


@dataclass(slots=True)
class EventTap:
    """A ``StreamTaskStatus`` filter stream that remembers every event per task."""

    tether: Tether
    labels: dict[str, str]
    states: tuple[int, ...] = ()
    exclude_progress: bool = False
    seen: dict[str, list[Seen]] = field(default_factory=dict)
    _waiters: dict[str, list[_Waiter]] = field(default_factory=dict)
    _call: Any = None
    _reader: asyncio.Task[None] | None = None
    on_event: Callable[[str, Seen], None] | None = None

    async def __aenter__(self) -> EventTap:
        request = spb.StreamTaskStatusRequest(
            filter=spb.TaskFilter(
                labels=self.labels, states=[tpb.TaskState.ValueType(s) for s in self.states]
            ),
            send_initial_state=True,
            exclude_progress=self.exclude_progress,
        )
        self._call = self.tether.tasks.StreamTaskStatus(request)
        # The checkpoint that ends the initial state says the subscription is live.
        async for response in self._call:
            if response.HasField("checkpoint") and response.checkpoint.initial_state_complete:
                break
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader

    async def _read(self) -> None:
        async for response in self._call:
            recv_ns = time.perf_counter_ns()
            recv_wall_ns = time.time_ns()
            if not response.HasField("task_event"):
                continue
            ev = response.task_event
            task = ev.task
            seen = Seen(
                recv_ns,
                recv_wall_ns,
                ev.type,
                task.state,
                ev.revision,
                ev.event_time.ToNanoseconds(),
                task.interrupt.stage,
                ev.output_chunk,
                task.engine_id if task.HasField("engine_id") else None,
                task.attempt,
            )
            self.seen.setdefault(task.name, []).append(seen)
            if self.on_event is not None:
                self.on_event(task.name, seen)
            waiters = self._waiters.get(task.name)
            if waiters:
                for waiter in list(waiters):
                    if not waiter.future.done() and waiter.predicate(seen):
                        waiter.future.set_result(seen)
                        waiters.remove(waiter)

    async def wait(self, name: str, predicate: Predicate, timeout: float = 60.0) -> Seen:
        """The first event of ``name`` matching ``predicate``, past or future."""
        for seen in self.seen.get(name, ()):
            if predicate(seen):
                return seen
        if self._reader is not None and self._reader.done():
            raise RuntimeError(f"the event stream ended: {self._reader!r}")
        future: asyncio.Future[Seen] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(_Waiter(predicate, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"{name}: no matching event within {timeout}s") from None

    def last_state(self, name: str) -> int | None:
        events = self.seen.get(name)
        return events[-1].state if events else None

    def forget(self, name: str) -> None:
        self.seen.pop(name, None)
        self._waiters.pop(name, None)
