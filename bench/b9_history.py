"""B9, restart and reads against history: stores of 10k, 100k and 1M finished tasks.

Each store is written directly (the same schema and codec as the server's), with one
retained event per task, so the log is as long as the history. Then a server starts
on it: the time from process start to SERVING is compared with a cold start on an
empty store in the same run; GetTask of random finished tasks and ListTasks pages
of 100 are timed over gRPC; a resume token taken before the restart must still
resume. Targets: SERVING within cold + 1 s; GetTask p99 < 5 ms; page p99 < 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sqlite3
import time
from pathlib import Path

import grpc

from tests.support import ServerProcess
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc
from tether_server.core.model import Task, TaskState
from tether_server.store import SqliteStore
from tether_server.store.codec import task_to_dict

from .harness import BenchResult, Row, Session, Summary, now_ns, say

ID = "B9"
TITLE = "restart time and reads against store size"


def write_store(path: Path, n: int) -> list[str]:
    """A store of ``n`` SUCCEEDED tasks, one event each; returns the task ids."""
    store = SqliteStore(path)
    store.open()
    store.close()
    ids = [f"{i:032x}" for i in range(1, n + 1)]
    now = time.time() - 3600
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    chunk = 10_000
    for start in range(0, n, chunk):
        tasks, events = [], []
        for i in range(start, min(n, start + chunk)):
            task = Task(
                id=ids[i],
                task="demo.echo",
                args={"value": i},
                labels={"bench": "b9"},
                state=TaskState.SUCCEEDED,
                engine_id=i % 2,
                attempt=1,
                create_time=now + i * 1e-3,
                start_time=now + i * 1e-3,
                end_time=now + i * 1e-3,
                update_time=now + i * 1e-3,
                result=i,
                revision=i + 1,
                seq=i + 1,
            )
            data = json.dumps(task_to_dict(task), separators=(",", ":"))
            tasks.append((task.id, task.seq, "SUCCEEDED", task.task, task.revision, data))
            events.append((task.revision, task.id, 2, task.end_time, "", data))
        conn.executemany(
            "INSERT INTO tasks (id, seq, state, task, revision, data) VALUES (?, ?, ?, ?, ?, ?)",
            tasks,
        )
        conn.executemany(
            "INSERT INTO events (revision, task_id, kind, time, chunk, data) VALUES (?, ?, ?, ?, ?, ?)",
            events,
        )
    conn.execute("COMMIT")
    conn.close()
    return ids


def _start(data_dir: Path, retain: int) -> tuple[ServerProcess, float]:
    server = ServerProcess(data_dir, engines=2, extra_args=["--retain-events", str(retain)])
    t0 = time.perf_counter()
    server.start(timeout=300)
    return server, time.perf_counter() - t0


def _measure(server: ServerProcess, ids: list[str], token: str) -> dict[str, Summary]:
    rng = random.Random(9)
    get_ns: list[int] = []
    page_ns: list[int] = []
    with grpc.insecure_channel(server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        for _ in range(50):  # warm up the channel and the server's readers
            stub.GetTask(spb.GetTaskRequest(name=f"tasks/{rng.choice(ids)}"), timeout=10)
        for _ in range(1000):
            name = f"tasks/{rng.choice(ids)}"
            t0 = now_ns()
            stub.GetTask(spb.GetTaskRequest(name=name), timeout=10)
            get_ns.append(now_ns() - t0)
        page_token = ""
        for _ in range(200):
            t0 = now_ns()
            page = stub.ListTasks(
                spb.ListTasksRequest(page_size=100, page_token=page_token), timeout=10
            )
            page_ns.append(now_ns() - t0)
            page_token = page.next_page_token
            if not page_token:
                break
        # The token from before the restart resumes (an idle checkpoint comes back).
        call = stub.StreamTaskStatus(spb.StreamTaskStatusRequest(resume_token=token), timeout=30)
        for response in call:
            if response.HasField("checkpoint"):
                call.cancel()
                break
    return {"get": Summary.of_ns(get_ns), "page": Summary.of_ns(page_ns)}


def _token(server: ServerProcess) -> str:
    with grpc.insecure_channel(server.address) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        return str(stub.ListTasks(spb.ListTasksRequest(page_size=1), timeout=30).resume_token)


async def run(session: Session) -> BenchResult:
    sizes = session.size([10_000, 100_000, 1_000_000], [10_000, 50_000])
    rows: list[Row] = []
    details: dict[str, object] = {}
    base = session.workdir / "b9"
    cold_dir = base / "cold" / "data"

    async def cold_start() -> float:
        server, seconds = await asyncio.to_thread(_start, cold_dir, 2_000_000)
        await asyncio.to_thread(server.stop)
        server.kill_leftovers()
        return seconds

    await cold_start()  # warms the file cache and the imports
    for n in sizes:
        data_dir = base / f"n{n}" / "data"
        data_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        ids = await asyncio.to_thread(write_store, data_dir / "tether.sqlite3", n)
        size = (data_dir / "tether.sqlite3").stat().st_size
        say(f"{n} tasks written in {time.perf_counter() - t0:.0f} s ({size / 2**20:.0f} MiB)")
        server, first = await asyncio.to_thread(_start, data_dir, 2 * n)
        token = await asyncio.to_thread(_token, server)
        await asyncio.to_thread(server.stop)
        server.kill_leftovers()
        # Restarts and cold starts alternate, so both see the same load on the machine.
        cold = min([await cold_start(), await cold_start()])
        server, restart = await asyncio.to_thread(_start, data_dir, 2 * n)
        try:
            figures = await asyncio.to_thread(_measure, server, ids, token)
        finally:
            await asyncio.to_thread(server.stop)
            server.kill_leftovers()
        # The store was written without fsync: removed now, its dirty pages are dropped
        # instead of being written back under the benches that follow.
        await asyncio.to_thread(shutil.rmtree, base / f"n{n}", ignore_errors=True)
        get, page = figures["get"], figures["page"]
        say(
            f"{n}: first start {first:.2f} s, restart {restart:.2f} s (cold {cold:.2f} s); "
            f"GetTask {get.text()}; "
            f"page of 100 {page.text()}"
        )
        details[str(n)] = {
            "cold_start_s": cold,
            "restart_s": restart,
            "first_start_s": first,
            "get": get.as_dict(),
            "page": page.as_dict(),
            "bytes": size,
        }
        label = f"{n:,} tasks"
        rows += [
            Row(ID, f"{label}: restart to SERVING", cold, restart, "s", "1+1",
                "<= cold + 1 s", restart <= cold + 1.0, ratio=None,
                why=f"{restart - cold:+.2f} s against cold"),
            Row(ID, f"{label}: GetTask p99", None, get.p99, "ms", str(get.n), "< 5 ms",
                get.p99 < 5.0, why=f"{get.p99:.2f} ms"),
            Row(ID, f"{label}: ListTasks page of 100 p99", None, page.p99, "ms", str(page.n),
                "< 20 ms", page.p99 < 20.0, why=f"{page.p99:.2f} ms"),
        ]  # fmt: skip
    await asyncio.to_thread(os.sync)  # what is left of the cold stores, before the next bench
    return BenchResult(ID, TITLE, rows, details=details)
