"""B5, stream fan-out: 1,000 concurrent ``StreamTaskStatus`` subscribers under load.

Load: 100 ``demo.echo`` tasks/s for 20 s (300 state changes/s: PENDING, RUNNING,
SUCCEEDED). Each task carries a ``shard`` label (100 shards); every subscriber filters on
one shard, so each event goes to 10 subscribers and every subscriber sees a steady
trickle (delivering all 300 events/s to all 1,000 would be 300,000 messages/s, beyond
what one Python client process can read on this box). A firehose subscriber on the run's
label records the full sequence.

* zero lost events: each subscriber's revisions == the firehose's revisions of its shard
  after its initial checkpoint (no gap, duplicate or reordering), and the firehose holds
  3 events per task;
* p99 delivery lag < 100 ms: receive wall clock - the event's ``event_time``;
* extra server RSS per idle subscriber < 30 KB: the server's RSS (psutil) before and after
  the 1,000 streams are open, before any load.

Baseline: a bare grpc.aio fan-out server (bench/rawstream.py) with the same subscribers,
shards and event rate. Subscribers read raw bytes and parse only after the run, so the
client's own cost stays out of the lag as far as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from tests.support import REPO, free_port
from tether.v1 import task_service_pb2 as spb

from .harness import MS, BenchResult, Row, Session, Summary, now_ns, say
from .probes import CpuMeter, LoopLagProbe, quiet_gc
from .tether_client import STREAM_METHOD, TERMINAL, Tether, run_label

ID = "B5"
TITLE = "stream fan-out, 1000 subscribers"
RATE_TASKS = 100
EVENTS_PER_TASK = 3
PER_SHARD = 10
CHANNELS = 4
TARGET_LAG_P99_MS = 100.0
TARGET_RSS_KB = 30.0


@dataclass(slots=True)
class Subscriber:
    """One stream: raw messages with their receive wall clock, parsed after the run."""

    shard: str
    call: Any = None
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    start_revision: int = 0
    task: asyncio.Task[None] | None = None


async def _read(sub: Subscriber, is_ready: Callable[[bytes], int | None]) -> None:
    async for message in sub.call:
        if not sub.ready.is_set():
            revision = is_ready(message)
            if revision is not None:
                sub.start_revision = revision
                sub.ready.set()
            continue
        sub.messages.append((time.time_ns(), message))


@dataclass(slots=True)
class Outcome:
    rss_per_sub_kb: float
    lags_ms: list[float]
    lost: int
    duplicated: int
    reordered: int
    delivered: int
    expected: int
    notes: list[str] = field(default_factory=list)


def _channels(address: str) -> list[grpc.aio.Channel]:
    # A local subchannel pool per channel: separate TCP connections, as separate clients.
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS)]


async def _open(
    channels: list[grpc.aio.Channel],
    method: str,
    requests: list[tuple[str, bytes]],
    is_ready: Callable[[bytes], int | None],
) -> list[Subscriber]:
    subs = []
    for i, (shard, request) in enumerate(requests):
        stream: Any = channels[i % len(channels)].unary_stream(method)
        sub = Subscriber(shard, call=stream(request))
        sub.task = asyncio.ensure_future(_read(sub, is_ready))
        subs.append(sub)
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subs)), timeout=120)
    return subs


async def _close(subs: list[Subscriber], channels: list[grpc.aio.Channel]) -> None:
    for sub in subs:
        sub.call.cancel()
    for sub in subs:
        if sub.task is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await sub.task
    for channel in channels:
        await channel.close()


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _compare(sub_revisions: list[int], expected: list[int]) -> tuple[int, int, int]:
    """(lost, duplicated, reordered) of one subscriber against its expected revisions."""
    got = set(sub_revisions)
    lost = len(set(expected) - got)
    duplicated = len(sub_revisions) - len(got)
    reordered = int(sub_revisions != sorted(sub_revisions))
    return lost, duplicated, reordered


# --------------------------------------------------------------------------- tether
def _tether_ready(message: bytes) -> int | None:
    response = spb.StreamTaskStatusResponse.FromString(message)
    if response.HasField("checkpoint") and response.checkpoint.initial_state_complete:
        return int(response.checkpoint.revision)
    return None


async def _tether(session: Session, n_subs: int, seconds: float) -> Outcome:
    server = await session.server()
    tether = await session.tether()
    label = run_label()
    shards = max(1, n_subs // PER_SHARD)

    def request(shard: str) -> bytes:
        labels = {"b5": label} if shard == "*" else {"b5": label, "shard": shard}
        return spb.StreamTaskStatusRequest(
            filter=spb.TaskFilter(labels=labels), send_initial_state=True
        ).SerializeToString()

    channels = _channels(tether.address)
    warm = await _open(channels, STREAM_METHOD, [("0", request("0"))] * 20, _tether_ready)
    await _close(warm, [])
    await asyncio.sleep(0.5)
    rss0 = _rss(server.pid)
    subs = await _open(
        channels,
        STREAM_METHOD,
        [(str(i % shards), request(str(i % shards))) for i in range(n_subs)],
        _tether_ready,
    )
    firehose = (await _open(channels, STREAM_METHOD, [("*", request("*"))], _tether_ready))[0]
    await asyncio.sleep(1.0)
    rss1 = _rss(server.pid)
    say(
        f"tether: {n_subs} idle streams open; server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB"
    )

    total = int(RATE_TASKS * seconds)
    rtts: list[float] = []
    notes: list[str] = []
    with quiet_gc(), LoopLagProbe() as client_lag, CpuMeter(server.pid) as cpu:
        probe = asyncio.ensure_future(_probe_server(tether, rtts))
        pending: set[asyncio.Future[Any]] = set()
        t0 = time.monotonic()
        for k in range(total):
            delay = t0 + k / RATE_TASKS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            labels = {"b5": label, "shard": str(k % shards)}
            fut = asyncio.ensure_future(tether.submit("demo.echo", {"value": k}, labels=labels))
            pending.add(fut)
            fut.add_done_callback(pending.discard)
        load_s = time.monotonic() - t0
        await asyncio.gather(*pending)

        def terminal_count() -> int:
            return sum(1 for _, m in firehose.messages if _is_terminal(m))

        if not await _wait_until(lambda: terminal_count() >= total, 120):
            notes.append(f"firehose saw {terminal_count()} of {total} tasks end")
        expected_total = total * EVENTS_PER_TASK * PER_SHARD
        await _wait_until(lambda: sum(len(s.messages) for s in subs) >= expected_total, 15)
        probe.cancel()
    say(f"tether: {total} tasks submitted in {load_s:.1f} s ({total / load_s:.0f}/s)")
    say(f"tether: CPU during the load (100% = one core): {cpu.text()}")
    notes.append(f"cpu {cpu.text()}")
    rtt = Summary.of(rtts)
    lag = Summary.of(client_lag.lags_ms)
    say(f"tether: GetCluster round trip during the load (server loop responsiveness): {rtt.text()}")
    say(f"tether: bench client's own loop lag during the load: {lag.text()}")
    await _close([*subs, firehose], channels)

    events = [_parse(m) for _, m in firehose.messages]
    per_task: dict[str, int] = {}
    for ev in events:
        per_task[ev.task.name] = per_task.get(ev.task.name, 0) + 1
    firehose_lost = sum(max(0, EVENTS_PER_TASK - c) for c in per_task.values())
    firehose_lost += (total - len(per_task)) * EVENTS_PER_TASK
    by_shard: dict[str, list[int]] = {}
    for ev in events:
        by_shard.setdefault(ev.task.labels["shard"], []).append(ev.revision)
    lags: list[float] = []
    lost = duplicated = reordered = delivered = expected_n = 0
    for sub in subs:
        revisions = []
        for recv, message in sub.messages:
            response = spb.StreamTaskStatusResponse.FromString(message)
            if not response.HasField("task_event"):
                continue
            ev = response.task_event
            revisions.append(ev.revision)
            lags.append((recv - ev.event_time.ToNanoseconds()) / MS)
        expected = [r for r in by_shard.get(sub.shard, []) if r > sub.start_revision]
        lo, du, re = _compare(revisions, expected)
        lost, duplicated, reordered = lost + lo, duplicated + du, reordered + re
        delivered += len(revisions)
        expected_n += len(expected)
    if firehose_lost:
        notes.append(f"firehose missed {firehose_lost} events")
    return Outcome(
        (rss1 - rss0) / n_subs / 1024,
        lags,
        lost + firehose_lost,
        duplicated,
        reordered,
        delivered,
        expected_n,
        notes,
    )


async def _probe_server(tether: Tether, rtts: list[float]) -> None:
    while True:
        t0 = now_ns()
        await tether.engines()
        rtts.append((now_ns() - t0) / MS)
        await asyncio.sleep(0.1)


def _parse(message: bytes) -> spb.TaskEvent:
    return spb.StreamTaskStatusResponse.FromString(message).task_event


def _is_terminal(message: bytes) -> bool:
    ev = _parse(message)
    return ev.type == spb.TASK_EVENT_TYPE_STATE_CHANGED and ev.task.state in TERMINAL


# --------------------------------------------------------------------------- raw grpc.aio
def _raw_ready(message: bytes) -> int | None:
    return -1 if message == b"ready" else None


async def _raw(n_subs: int, seconds: float) -> Outcome:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.rawstream", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    channels: list[grpc.aio.Channel] = []
    try:
        address = f"127.0.0.1:{port}"
        channels = _channels(address)
        await asyncio.wait_for(channels[0].channel_ready(), timeout=30)
        shards = max(1, n_subs // PER_SHARD)
        method = "/bench.Fanout/Subscribe"
        warm = await _open(channels, method, [("0", b"0")] * 20, _raw_ready)
        await _close(warm, [])
        await asyncio.sleep(0.5)
        rss0 = _rss(proc.pid)
        subs = await _open(
            channels,
            method,
            [(str(i % shards), str(i % shards).encode()) for i in range(n_subs)],
            _raw_ready,
        )
        await asyncio.sleep(1.0)
        rss1 = _rss(proc.pid)
        say(
            f"raw: {n_subs} idle streams open; server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB"
        )
        rate = RATE_TASKS * EVENTS_PER_TASK
        start: Any = channels[0].unary_unary("/bench.Fanout/Start")
        total = int(rate * seconds)
        server = {"raw grpc.aio server": [psutil.Process(proc.pid)]}
        with quiet_gc(), LoopLagProbe() as client_lag, CpuMeter(None, server) as cpu:
            await start(f"{rate} {seconds} {shards}".encode())
            await asyncio.sleep(seconds)
            await _wait_until(lambda: sum(len(s.messages) for s in subs) >= total * PER_SHARD, 15)
        await _close(subs, [])
        say(f"raw: CPU during the load (100% = one core): {cpu.text()}")
        say(
            f"raw: bench client's own loop lag during the load: {Summary.of(client_lag.lags_ms).text()}"
        )
        lags: list[float] = []
        lost = duplicated = reordered = delivered = expected_n = 0
        for sub in subs:
            revisions = []
            for recv, message in sub.messages:
                k, _shard, sent = message.split()
                revisions.append(int(k))
                lags.append((recv - int(sent)) / MS)
            expected = [k for k in range(total) if str((k // 3) % shards) == sub.shard]
            lo, du, re = _compare(revisions, expected)
            lost, duplicated, reordered = lost + lo, duplicated + du, reordered + re
            delivered += len(revisions)
            expected_n += len(expected)
        return Outcome(
            (rss1 - rss0) / n_subs / 1024, lags, lost, duplicated, reordered, delivered, expected_n
        )
    finally:
        for channel in channels:
            await channel.close()
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- the bench
async def run(session: Session) -> BenchResult:
    n_subs = session.size(1000, 200)
    seconds = session.size(20, 4)
    await session.server()  # started before the raw run, so both see the same box
    raw = await _raw(n_subs, seconds)
    teth = await _tether(session, n_subs, seconds)
    raw_lag, lag = Summary.of(raw.lags_ms), Summary.of(teth.lags_ms)
    say(f"raw grpc.aio fan-out delivery lag: {raw_lag.text()}")
    say(f"tether delivery lag (event_time -> receive): {lag.text()}")
    for name, o in (("raw", raw), ("tether", teth)):
        say(
            f"{name}: delivered {o.delivered} of {o.expected} expected; lost {o.lost}, "
            f"duplicated {o.duplicated}, out-of-order subscribers {o.reordered}"
            + ("; " + "; ".join(o.notes) if o.notes else "")
        )
    samples = f"{n_subs} subs, {seconds}s"
    lost_met = teth.lost == 0 and teth.duplicated == 0 and teth.reordered == 0
    lag_met = lag.p99 < TARGET_LAG_P99_MS
    rss_met = teth.rss_per_sub_kb < TARGET_RSS_KB
    rows = [
        Row(
            ID,
            "lost / duplicated / reordered events",
            float(raw.lost + raw.duplicated + raw.reordered),
            float(teth.lost + teth.duplicated + teth.reordered),
            "events",
            samples,
            "0",
            lost_met,
            ratio=None,
            why=""
            if lost_met
            else f"lost {teth.lost}, duplicated {teth.duplicated}, reordered {teth.reordered}",
        ),
        Row(
            ID,
            "p99 delivery lag",
            raw_lag.p99,
            lag.p99,
            "ms",
            f"{raw_lag.n}+{lag.n} msgs",
            f"< {TARGET_LAG_P99_MS:.0f} ms",
            lag_met,
            why="" if lag_met else f"p99 {lag.p99:.0f} ms >= {TARGET_LAG_P99_MS:.0f} ms",
        ),
        Row(
            ID,
            "server RSS per idle subscriber",
            raw.rss_per_sub_kb,
            teth.rss_per_sub_kb,
            "KB",
            f"{n_subs} streams",
            f"< {TARGET_RSS_KB:.0f} KB",
            rss_met,
            why="" if rss_met else f"{teth.rss_per_sub_kb:.1f} KB >= {TARGET_RSS_KB:.0f} KB",
        ),
    ]
    details = {
        "subscribers": n_subs,
        "seconds": seconds,
        "tasks_per_second": RATE_TASKS,
        "raw": {**_outcome_dict(raw), "lag_ms": raw_lag.as_dict()},
        "tether": {**_outcome_dict(teth), "lag_ms": lag.as_dict()},
    }
    return BenchResult(ID, TITLE, rows, details)


def _outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "rss_per_sub_kb": o.rss_per_sub_kb,
        "lost": o.lost,
        "duplicated": o.duplicated,
        "reordered": o.reordered,
        "delivered": o.delivered,
        "expected": o.expected,
        "notes": o.notes,
    }
