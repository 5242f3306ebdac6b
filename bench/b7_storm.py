"""B7, interrupt storm: short tasks, interrupts at random moments.

tether: 2,000 ``demo.sleep`` tasks of 1-5 ms from 16 submitters; meanwhile
``InterruptTask`` goes out at random moments (exponential gaps, mean 7 ms) to a random
task -- a RUNNING one most of the time, else a PENDING or an ended one -- until 40 % of
the tasks were aimed at. Then: lost tasks (not ended 60 s later), engine deaths (an
engine that is not the one it was, by id and pid), and interrupts that hit another task
(a task never aimed at that did not SUCCEED).

Baseline: raw ipyparallel, the same tasks round-robin on 2 engines of a cluster of its
own, ``os.kill(engine pid, SIGINT)`` at the same pace (signals are not task-addressed
there, so every ``KeyboardInterrupt`` is a hit on whatever ran); bounded in time, the
cluster stopped and its processes killed afterwards.
Targets: 0 lost, 0 engine deaths, 0 interrupts that hit another task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_pb2 as tpb

from .engine_tasks import short_sleep
from .harness import BenchResult, RawCluster, Row, Session, say
from .tether_client import TERMINAL, EventTap, Seen, run_label, state_name

ID = "B7"
TITLE = "interrupt storm"
MEAN_GAP_S = 0.007
AIM_FRACTION = 0.4
SUBMITTERS = 16
MAX_QUEUED = 4


@dataclass(slots=True)
class StormOutcome:
    tasks: int
    lost: int
    engine_deaths: int
    wrong_hits: int
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- raw
def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _ClientErrors(logging.Handler):
    """Counts the errors the raw client logs from its IO thread during the storm.

    An engine interrupted while it sends can put a message with a broken signature on
    the wire; ipyparallel 9.2's client then fails in its own error path
    (``'Client' object has no attribute 'log'``) and tornado/asyncio log a traceback per
    message. They are part of the baseline's result: counted here, not printed.
    """

    LOGGERS = ("tornado.general", "tornado.application", "asyncio")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._saved: list[tuple[logging.Logger, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1

    def __enter__(self) -> _ClientErrors:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.propagate))
            logger.addHandler(self)
            logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, propagate in self._saved:
            logger.removeHandler(self)
            logger.propagate = propagate


async def _raw_storm(session: Session, n: int, bound_s: float) -> StormOutcome:
    async with session.private_raw_cluster() as raw:
        pids = list(raw.engine_pids().values())
        with _ClientErrors() as client_errors:
            counts, sent = await _storm_raw_engines(raw, pids, n, bound_s)
        deaths = sum(1 for pid in pids if not _alive(pid))
    if client_errors.count:
        counts["client errors logged (bad message signature)"] = client_errors.count
    say(f"raw storm: {sent} SIGINTs at {n} tasks; {dict(counts)}; engines dead {deaths}/2")
    return StormOutcome(
        n,
        lost=counts["never completed"],
        engine_deaths=deaths,
        wrong_hits=counts["error KeyboardInterrupt"],
        counts=dict(counts),
    )


async def _storm_raw_engines(
    raw: RawCluster, pids: list[int], n: int, bound_s: float
) -> tuple[collections.Counter[str], int]:
    """Run ``n`` short tasks round-robin while SIGINTs hit the engines; count outcomes."""
    counts: collections.Counter[str] = collections.Counter()
    ars = [raw.view(k % 2).apply_async(short_sleep, (k % 5) + 1) for k in range(n)]
    stop = threading.Event()
    sent = 0

    def shooter() -> None:
        nonlocal sent
        rng = random.Random(7)
        while not stop.is_set():
            time.sleep(rng.expovariate(1 / MEAN_GAP_S))
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(pids), signal.SIGINT)
                sent += 1

    thread = threading.Thread(target=shooter, name="raw-sigint-storm", daemon=True)
    thread.start()
    deadline = time.monotonic() + bound_s
    try:
        while time.monotonic() < deadline and not all(ar.ready() for ar in ars):
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        thread.join(5)
    await asyncio.sleep(1.0)  # replies in flight
    for ar in ars:
        if not ar.ready():
            counts["never completed"] += 1
        elif ar.successful():
            counts["ok"] += 1
        else:
            try:
                ar.get(0)
            except Exception as exc:
                counts[f"error {getattr(exc, 'ename', type(exc).__name__)}"] += 1
    return counts, sent


# --------------------------------------------------------------------------- tether
async def _tether_storm(session: Session, n: int) -> StormOutcome:
    tether = await session.tether()
    before = {(e.id, e.pid) for e in await tether.engines() if e.state == cpb.ENGINE_STATE_IDLE}
    label = run_label()
    rng = random.Random(11)
    state: dict[str, int] = {}
    by_state: dict[int, set[str]] = collections.defaultdict(set)
    aimed: set[str] = set()
    replies: collections.Counter[str] = collections.Counter()
    names: list[str] = []

    def on_event(name: str, seen: Seen) -> None:
        old = state.get(name)
        if old is not None:
            by_state[old].discard(name)
        state[name] = seen.state
        by_state[seen.state].add(name)

    async def interrupt(name: str) -> None:
        try:
            await tether.interrupt(name, reason="storm")
            replies["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            replies[exc.code().name] += 1

    async with EventTap(tether, {"bench": label}, exclude_progress=True) as tap:
        tap.on_event = on_event
        next_index = 0

        async def submitter() -> None:
            nonlocal next_index
            while next_index < n:
                # Keep the queue short, so that most tasks are aimed at while they run.
                while len(by_state[tpb.TASK_STATE_PENDING]) >= MAX_QUEUED:
                    await asyncio.sleep(0.001)
                next_index += 1
                seconds = rng.uniform(0.001, 0.005)
                task = await tether.submit(
                    "demo.sleep", {"seconds": seconds}, labels={"bench": label}
                )
                names.append(task.name)

        async def shooter() -> None:
            in_flight: set[asyncio.Future[Any]] = set()

            def unfinished() -> bool:
                return next_index < n or bool(
                    by_state[tpb.TASK_STATE_RUNNING] or by_state[tpb.TASK_STATE_PENDING]
                )

            while len(aimed) < AIM_FRACTION * n and unfinished():
                await asyncio.sleep(rng.expovariate(1 / MEAN_GAP_S))
                r = rng.random()
                if r < 0.7:
                    pool = by_state[tpb.TASK_STATE_RUNNING]
                elif r < 0.9:
                    pool = by_state[tpb.TASK_STATE_PENDING]
                else:
                    pool = set(names[-50:])
                choices = [t for t in pool if t not in aimed]
                if not choices:
                    continue
                name = rng.choice(choices)
                aimed.add(name)  # before the call: an aimed task may legitimately end INTERRUPTED
                fut = asyncio.ensure_future(interrupt(name))
                in_flight.add(fut)
                fut.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)

        t0 = time.monotonic()
        await asyncio.gather(shooter(), *(submitter() for _ in range(SUBMITTERS)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(state.get(t) not in TERMINAL for t in names):
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        unseen = [t for t in names if state.get(t) not in TERMINAL]
        # The stream may lag behind the task table, which is the truth.
        lost = [t for t in unseen if (await tether.get(t)).state not in TERMINAL]
        wrong = [t for t in names if t not in aimed and state.get(t) != tpb.TASK_STATE_SUCCEEDED]
        outcomes: collections.Counter[str] = collections.Counter(
            f"{'aimed' if t in aimed else 'not aimed'} {state_name(state.get(t, 0))}" for t in names
        )
    after = await tether.engines()
    alive_now = {
        (e.id, e.pid) for e in after if e.state in (cpb.ENGINE_STATE_IDLE, cpb.ENGINE_STATE_BUSY)
    }
    deaths = len(before - alive_now)
    say(
        f"tether storm: {n} tasks in {elapsed:.1f} s; {len(aimed)} InterruptTask calls {dict(replies)}; "
        f"engines dead {deaths}/2"
    )
    say(f"tether outcomes: {dict(sorted(outcomes.items()))}")
    notes = [f"{t} ended {state_name(state.get(t, 0))} without an interrupt" for t in wrong[:5]]
    for note in notes:
        say(note)
    return StormOutcome(
        n,
        len(lost),
        deaths,
        len(wrong),
        counts={**outcomes, **{f"reply {k}": v for k, v in replies.items()}},
        notes=notes,
    )


async def run(session: Session) -> BenchResult:
    n = session.size(2000, 300)
    raw_runs = session.size(2, 1)
    bound = session.size(25.0, 10.0)
    raws = []
    for _ in range(raw_runs):
        raws.append(await _raw_storm(session, n, bound))
    teth = await _tether_storm(session, n)
    raw_lost = sum(r.lost for r in raws)
    raw_deaths = sum(r.engine_deaths for r in raws)
    raw_hits = sum(r.wrong_hits for r in raws)
    samples = f"raw {raw_runs}x{n}, tether {n}"
    rows = [
        Row(
            ID,
            "lost tasks",
            float(raw_lost),
            float(teth.lost),
            "tasks",
            samples,
            "0",
            teth.lost == 0,
            why=f"{teth.lost} of {n} tasks never ended",
        ),
        Row(
            ID,
            "engine deaths",
            float(raw_deaths),
            float(teth.engine_deaths),
            "engines",
            samples,
            "0",
            teth.engine_deaths == 0,
            why=f"{teth.engine_deaths} engines died",
        ),
        Row(
            ID,
            "tasks hit by an interrupt meant for another",
            float(raw_hits),
            float(teth.wrong_hits),
            "tasks",
            samples,
            "0",
            teth.wrong_hits == 0,
            why=f"{teth.wrong_hits} tasks never aimed at did not succeed",
        ),
    ]
    details = {
        "tasks": n,
        "raw_runs": [r.counts | {"engine_deaths": r.engine_deaths} for r in raws],
        "tether": teth.counts | {"engine_deaths": teth.engine_deaths, "lost": teth.lost},
    }
    return BenchResult(ID, TITLE, rows, details)
