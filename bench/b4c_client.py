"""B4c, throughput through the typed Python client: ``submit`` + ``result``, 64 in flight.

tether: 64 asyncio workers of one ``tether.AsyncClient`` each loop ``await
client.submit("demo.echo")`` then ``await handle.result()``; the clock runs from the
first submit to the last result. Every ``result()`` goes over the client's one
outcome stream. Info rows run the same count through the blocking
``Client.map(max_in_flight=64)``, and through the raw generated stubs as B4 does (64
submitters, one filter stream counting SUCCEEDED): the client's own cost is the gap
between that row and the first.
Baseline: raw DirectView round-robin over the same 2 engines -- submit everything, then
``get()`` every result (as B4).
Target: ratio >= 0.5.
"""

from __future__ import annotations

import asyncio
import statistics

import tether
from tether.v1 import task_pb2 as tpb

from .engine_tasks import noop
from .harness import BenchResult, RawCluster, Row, Session, alternate, now_ns, say
from .probes import CpuMeter
from .tether_client import EventTap, Tether, run_label

ID = "B4c"
TITLE = "throughput through the Python client, submit + result, 64 in flight"
TARGET_RATIO = 0.5
IN_FLIGHT = 64


def raw_round_robin(raw: RawCluster, count: int) -> float:
    """Tasks/s of raw DirectView round-robin over engines 0 and 1: submit all, then get all."""
    views = [raw.view(0), raw.view(1)]
    t0 = now_ns()
    results = [views[k % 2].apply_async(noop) for k in range(count)]
    for result in results:
        result.get(timeout=60)
    return count / ((now_ns() - t0) / 1e9)


async def submit_and_result(address: str, count: int) -> float:
    """Tasks/s of ``count`` echo tasks, ``IN_FLIGHT`` asyncio workers of one AsyncClient."""
    async with tether.AsyncClient(address) as client:
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                handle = await client.submit("demo.echo", {"value": next_index})
                await handle.result(timeout=120)

        t0 = now_ns()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return count / ((now_ns() - t0) / 1e9)


async def raw_stubs(stubs: Tether, count: int) -> float:
    """Tasks/s of ``count`` echo tasks through the generated stubs, as B4 measures tether."""
    label = run_label()
    finished = asyncio.Event()
    succeeded = 0

    def on_event(name: str, seen: object) -> None:
        nonlocal succeeded
        succeeded += 1
        if succeeded == count:
            finished.set()

    tap = EventTap(
        stubs, {"bench": label}, states=(tpb.TASK_STATE_SUCCEEDED,), exclude_progress=True
    )
    tap.on_event = on_event
    async with tap:
        next_index = 0

        async def submitter() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                await stubs.submit("demo.echo", {"value": None}, labels={"bench": label})

        t0 = now_ns()
        await asyncio.gather(*(submitter() for _ in range(IN_FLIGHT)))
        await asyncio.wait_for(finished.wait(), timeout=120)
        return count / ((now_ns() - t0) / 1e9)


def blocking_map(address: str, count: int) -> float:
    """Tasks/s of ``count`` echo tasks through ``Client.map(max_in_flight=64)``."""
    with tether.Client(address) as client:
        t0 = now_ns()
        results = client.map(
            "demo.echo", ({"value": i} for i in range(count)), max_in_flight=IN_FLIGHT
        )
        for expected, value in enumerate(results):
            assert value == expected, (value, expected)
        return count / ((now_ns() - t0) / 1e9)


async def run(session: Session) -> BenchResult:
    n = session.size(2000, 300)
    reps = session.size(3, 1)
    raw = await session.raw()
    server = await session.server()
    address = server.process.address
    raw_rates: list[float] = []
    client_rates: list[float] = []
    map_rates: list[float] = []
    stub_rates: list[float] = []
    stubs = await session.tether()

    async def baseline(i: int) -> None:
        count = n if i >= 0 else n // 10
        with CpuMeter(None, {"raw cluster": raw.processes()}) as cpu:
            rate = raw_round_robin(raw, count)
        if i >= 0:
            raw_rates.append(rate)
            say(f"raw rep {i}: {rate:.0f} tasks/s; CPU (100% = one core): {cpu.text()}")

    async def with_client(i: int) -> None:
        count = n if i >= 0 else n // 10
        with CpuMeter(server.pid) as cpu:
            rate = await submit_and_result(address, count)
        mapped = await asyncio.to_thread(blocking_map, address, count)
        raw_api = await raw_stubs(stubs, count)
        if i >= 0:
            client_rates.append(rate)
            map_rates.append(mapped)
            stub_rates.append(raw_api)
            say(f"AsyncClient submit + result rep {i}: {rate:.0f} tasks/s")
            say(f"  CPU (100% = one core): {cpu.text()}")
            say(f"Client.map rep {i}: {mapped:.0f} tasks/s")
            say(f"generated stubs (B4's method) rep {i}: {raw_api:.0f} tasks/s")

    await alternate(reps, baseline, with_client, warmup=1)
    base = statistics.median(raw_rates)
    rows = [
        _row(f"{n} no-ops, AsyncClient submit + result", base, client_rates, raw_rates, True),
        _row(f"{n} no-ops, Client.map", base, map_rates, raw_rates, False),
        _row(f"{n} no-ops, generated stubs (as B4)", base, stub_rates, raw_rates, False),
    ]
    say(
        "client against the generated stubs: "
        f"{statistics.median(client_rates) / statistics.median(stub_rates):.2f}"
    )
    say(f"ratio {statistics.median(client_rates) / base:.2f} (target {TARGET_RATIO})")
    details = {
        "tasks": n,
        "in_flight": IN_FLIGHT,
        "raw_rates": raw_rates,
        "async_client_rates": client_rates,
        "client_map_rates": map_rates,
        "generated_stub_rates": stub_rates,
    }
    return BenchResult(ID, TITLE, rows, details)


def _row(
    metric: str, base: float, rates: list[float], raw_rates: list[float], targeted: bool
) -> Row:
    rate = statistics.median(rates)
    ratio = rate / base
    met: bool | None = ratio >= TARGET_RATIO if targeted else None
    return Row(
        ID,
        metric,
        base,
        rate,
        "tasks/s",
        f"{len(raw_rates)}+{len(rates)} runs",
        f"ratio >= {TARGET_RATIO}" if targeted else "-",
        met,
        why=f"ratio {ratio:.2f} < {TARGET_RATIO}" if met is False else "",
    )
