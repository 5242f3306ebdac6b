"""B8, sustained load: memory of the server, the hub and the engines over many no-op tasks.

A fresh tether server runs ``demo.echo`` tasks with at most 128 in flight (64
submitters, completions counted on one filter stream). Every 2% of the run the RSS
of the server, of the ipyparallel hub (with the scheduler processes it forks) and of
each engine is sampled; the figure is the least-squares slope over the second half of
the run, in bytes per task: what a server that runs for months gains per task once warm.
Targets: server < 200, hub < 100, engines < 50 bytes per task.
There is no raw baseline: raw ipyparallel's client and hub keep every task's id.
"""

from __future__ import annotations

import asyncio

import psutil

from tether.v1 import task_pb2 as tpb

from .harness import BenchResult, Row, Session, TetherServer, now_ns, say
from .tether_client import EventTap, run_label

ID = "B8"
TITLE = "sustained load, RSS slope per task"
TARGETS = {"server": 200.0, "hub": 100.0, "engine": 50.0}
IN_FLIGHT = 128
SUBMITTERS = 64


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else float("nan")


def _cluster_rss(server_pid: int) -> tuple[int, list[int]]:
    """(hub RSS, engine RSSes) among the server's descendants."""
    hub = 0
    engines: list[int] = []
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if "ipyparallel_hub" in cmd and proc.ppid() == server_pid:
                # The hub and the schedulers it forks (their traffic is per task too).
                hub = proc.memory_info().rss + sum(
                    child.memory_info().rss for child in proc.children(recursive=True)
                )
            elif "ipyparallel.engine" in cmd and "nanny" not in cmd:
                engines.append(proc.memory_info().rss)
        except psutil.Error:
            continue
    return hub, engines


async def run(session: Session) -> BenchResult:
    total = session.size(100_000, 10_000)
    server = TetherServer(session.workdir / "b8" / "data")
    tether = await server.start()
    label = run_label()
    samples: list[tuple[int, int, int, list[int]]] = []
    done = 0
    finished = asyncio.Event()
    slots = asyncio.Semaphore(IN_FLIGHT)
    every = max(1, total // 50)

    def on_event(name: str, seen: object) -> None:
        nonlocal done
        done += 1
        slots.release()
        if done % every == 0:
            hub, engines = _cluster_rss(server.pid)
            samples.append((done, server.rss_bytes(), hub, engines))
        if done == total:
            finished.set()

    tap = EventTap(
        tether, {"bench": label}, states=(tpb.TASK_STATE_SUCCEEDED,), exclude_progress=True
    )
    tap.on_event = on_event
    t0 = now_ns()
    try:
        async with tap:
            submitted = 0

            async def submitter() -> None:
                nonlocal submitted
                while submitted < total:
                    submitted += 1
                    await slots.acquire()
                    await tether.submit("demo.echo", {"value": None}, labels={"bench": label})
                    if len(tap.seen) > 10_000:
                        tap.seen.clear()

            await asyncio.gather(*(submitter() for _ in range(SUBMITTERS)))
            await asyncio.wait_for(finished.wait(), timeout=600)
    finally:
        await server.stop()
    seconds = (now_ns() - t0) / 1e9
    say(f"{total} tasks in {seconds:.0f} s ({total / seconds:.0f} tasks/s), {len(samples)} samples")
    half = [s for s in samples if s[0] > total // 2]
    figures = {
        "server": slope([(float(n), float(rss)) for n, rss, _h, _e in half]),
        "hub": slope([(float(n), float(hub)) for n, _s, hub, _e in half]),
        "engine": max(
            (
                slope([(float(n), float(engines[i])) for n, _s, _h, engines in half])
                for i in range(min(len(s[3]) for s in half))
            ),
            default=float("nan"),
        ),
    }
    first, last = samples[0], samples[-1]
    say(
        f"server RSS {first[1] / 2**20:.1f} -> {last[1] / 2**20:.1f} MiB, "
        f"hub {first[2] / 2**20:.1f} -> {last[2] / 2**20:.1f} MiB, "
        f"engines {[round(e / 2**20, 1) for e in first[3]]} -> {[round(e / 2**20, 1) for e in last[3]]} MiB"
    )
    rows = []
    for who, value in figures.items():
        target = TARGETS[who]
        met = value < target
        rows.append(
            Row(
                ID,
                f"{who} RSS slope, second half" + (" (worst engine)" if who == "engine" else ""),
                None,
                value,
                "B/task",
                f"{len(half)} samples over {total // 2} tasks",
                f"< {target:.0f} B/task",
                met,
                why="" if met else f"{value:.0f} B/task",
            )
        )
    return BenchResult(
        ID,
        TITLE,
        rows,
        details={
            "tasks": total,
            "seconds": seconds,
            "samples": [
                {"tasks": n, "server": s, "hub": h, "engines": e} for n, s, h, e in samples
            ],
            "slopes_bytes_per_task": figures,
        },
    )
