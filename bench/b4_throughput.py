"""B4, throughput: no-op tasks with many in flight, 2 engines.

tether: 64 concurrent grpc.aio submitters send ``SubmitTask(demo.echo)`` while one
filter stream (state SUCCEEDED, this run's label) counts; the clock runs from the first
submit to the last SUCCEEDED received.
Baseline: raw DirectView round-robin over the same 2 engines -- submit everything, then
``get()`` every result.
Targets: ratio >= 1.0; stretch >= 1.1.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from tether.v1 import task_pb2 as tpb

from .engine_tasks import noop
from .harness import (
    BenchResult,
    Row,
    Session,
    Summary,
    alternate,
    now_ns,
    say,
)
from .probes import CpuMeter, LoopLagProbe
from .tether_client import EventTap, run_label

ID = "B4"
TITLE = "throughput, no-op tasks, many in flight"
TARGET_RATIO = 1.0
STRETCH_RATIO = 1.1
SUBMITTERS = 64


async def run(session: Session) -> BenchResult:
    n = session.size(2000, 300)
    reps = session.size(3, 1)
    raw = await session.raw()
    tether = await session.tether()
    server = await session.server()
    views = [raw.view(0), raw.view(1)]
    raw_rates: list[float] = []
    depth1_rates: list[float] = []
    tether_rates: list[float] = []
    submit_phase: list[float] = []
    client_lag: list[float] = []
    cpu_shares: list[dict[str, float]] = []

    async def baseline(i: int) -> None:
        count = n if i >= 0 else n // 10
        with CpuMeter(None, {"raw cluster": raw.processes()}) as cpu:
            t0 = now_ns()
            ars = [views[k % 2].apply_async(noop) for k in range(count)]
            for ar in ars:
                ar.get(timeout=60)
            rate = count / ((now_ns() - t0) / 1e9)
        if i >= 0:
            raw_rates.append(rate)
            say(f"raw rep {i}: {rate:.0f} tasks/s; CPU (100% = one core): {cpu.text()}")
        # The same engines, one task in flight per engine, as tether dispatches.
        t0 = now_ns()
        next_index = 0

        async def worker(view: Any) -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                await asyncio.wrap_future(view.apply_async(noop))

        await asyncio.gather(*(worker(v) for v in views))
        rate = count / ((now_ns() - t0) / 1e9)
        if i >= 0:
            depth1_rates.append(rate)
            say(f"raw rep {i}, one task in flight per engine: {rate:.0f} tasks/s")

    async def with_tether(i: int) -> None:
        count = n if i >= 0 else n // 10
        label = run_label()
        done = asyncio.Event()
        succeeded = 0

        def on_event(name: str, seen: object) -> None:
            nonlocal succeeded
            succeeded += 1
            if succeeded == count:
                done.set()

        tap = EventTap(
            tether, {"bench": label}, states=(tpb.TASK_STATE_SUCCEEDED,), exclude_progress=True
        )
        tap.on_event = on_event
        async with tap:
            next_index = 0

            async def submitter() -> None:
                nonlocal next_index
                while next_index < count:
                    next_index += 1
                    await tether.submit("demo.echo", {"value": None}, labels={"bench": label})

            with LoopLagProbe() as probe, CpuMeter(server.pid) as cpu:
                t0 = now_ns()
                await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))
                t_submitted = now_ns()
                await asyncio.wait_for(done.wait(), timeout=120)
                t_end = now_ns()
            tap.seen.clear()
        rate = count / ((t_end - t0) / 1e9)
        if i >= 0:
            tether_rates.append(rate)
            submit_phase.append((t_submitted - t0) / 1e9)
            client_lag.extend(probe.lags_ms)
            say(
                f"tether rep {i}: {rate:.0f} tasks/s (all submitted after {(t_submitted - t0) / 1e9:.2f} s)"
            )
            say(f"  CPU (100% = one core): {cpu.text()}")
            cpu_shares.append(cpu.shares)

    await alternate(reps, baseline, with_tether, warmup=1)
    base = statistics.median(raw_rates)
    teth = statistics.median(tether_rates)
    ratio = teth / base
    met = ratio >= TARGET_RATIO
    lag = Summary.of(client_lag)
    say(f"bench client loop lag during the tether reps: {lag.text()}")
    stretch = "stretch met" if ratio >= STRETCH_RATIO else f"stretch {STRETCH_RATIO} not met"
    say(f"ratio {ratio:.2f} ({stretch})")
    rows = [
        Row(
            ID,
            f"{n} no-ops, {SUBMITTERS} submitters",
            base,
            teth,
            "tasks/s",
            f"{len(raw_rates)}+{len(tether_rates)} runs",
            f"ratio >= {TARGET_RATIO} (stretch {STRETCH_RATIO})",
            met,
            why="" if met else f"ratio {ratio:.2f} < {TARGET_RATIO}",
        )
    ]
    depth1 = statistics.median(depth1_rates)
    rows.append(
        Row(
            ID,
            "same, baseline: raw with 1 task in flight per engine",
            depth1,
            teth,
            "tasks/s",
            f"{len(depth1_rates)}+{len(tether_rates)} runs",
            "-",
            None,
        )
    )
    details = {
        "raw_one_in_flight_rates": depth1_rates,
        "tasks": n,
        "raw_rates": raw_rates,
        "tether_rates": tether_rates,
        "tether_submit_phase_s": submit_phase,
        "client_loop_lag_ms": lag.as_dict(),
        "cpu_percent_of_one_core": cpu_shares,
    }
    return BenchResult(ID, TITLE, rows, details)
