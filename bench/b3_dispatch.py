"""B3, dispatch latency: a no-op task, one at a time.

tether: ``SubmitTask(demo.echo)`` sent -> its SUCCEEDED event read from a stream.
Baseline: raw ``DirectView.apply_async(noop).get()``, alternating engines as tether does.
Target: median ratio <= 1.5.
"""

from __future__ import annotations

import time

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .engine_tasks import noop
from .harness import BenchResult, Row, Session, Summary, alternate, now_ns, say
from .tether_client import EventTap, Seen, in_state, run_label

ID = "B3"
TITLE = "dispatch latency, sequential no-op"
TARGET_RATIO = 1.5

LEGS = (
    "client send -> PENDING (server accepted)",
    "PENDING -> RUNNING (dispatched)",
    "RUNNING -> SUCCEEDED (engine round trip)",
    "SUCCEEDED -> received by the subscriber",
)


async def run(session: Session) -> BenchResult:
    pairs = session.size(400, 60)
    warmup = session.size(40, 10)
    raw = await session.raw()
    tether = await session.tether()
    label = run_label()
    raw_ns: list[int] = []
    legs: dict[str, list[int]] = {leg: [] for leg in LEGS}
    tether_ns: list[int] = []
    reply_ns: list[int] = []

    async with EventTap(tether, {"bench": label}) as tap:

        async def baseline(i: int) -> None:
            view = raw.view(i % 2)
            t0 = now_ns()
            view.apply_async(noop).get(timeout=30)
            if i >= 0:
                raw_ns.append(now_ns() - t0)

        async def with_tether(i: int) -> None:
            wall0 = time.time_ns()
            t0 = now_ns()
            task = await tether.submit("demo.echo", {"value": i}, labels={"bench": label})
            t_reply = now_ns()
            done = await tap.wait(task.name, in_state(tpb.TASK_STATE_SUCCEEDED), timeout=30)
            if i >= 0:
                tether_ns.append(done.recv_ns - t0)
                reply_ns.append(t_reply - t0)
                _legs(tap.seen[task.name], wall0, legs)
            tap.forget(task.name)

        await alternate(pairs, baseline, with_tether, warmup=warmup)

    base, teth, reply = Summary.of_ns(raw_ns), Summary.of_ns(tether_ns), Summary.of_ns(reply_ns)
    say(f"raw apply_async(noop).get():          {base.text()}")
    say(f"tether SubmitTask -> SUCCEEDED event: {teth.text()}")
    say(f"  of which SubmitTask reply:          {reply.text()}")
    say("  legs of the tether path (server clock = event_time of each event):")
    leg_summaries = {leg: Summary.of_ns(values) for leg, values in legs.items()}
    for leg, summary in leg_summaries.items():
        say(f"    {leg:<48} {summary.text()}")
    ratio = teth.median / base.median
    met = ratio <= TARGET_RATIO
    samples = f"{base.n}+{teth.n}"
    rows = [
        Row(
            ID,
            "median no-op submit -> SUCCEEDED",
            base.median,
            teth.median,
            "ms",
            samples,
            f"ratio <= {TARGET_RATIO}",
            met,
            why="" if met else f"median ratio {ratio:.2f} > {TARGET_RATIO}",
        ),
        Row(ID, "p99 no-op submit -> SUCCEEDED", base.p99, teth.p99, "ms", samples, "-", None),
    ]
    details = {
        "raw_ms": base.as_dict(),
        "tether_ms": teth.as_dict(),
        "submit_reply_ms": reply.as_dict(),
        "legs_ms": {leg: v.as_dict() for leg, v in leg_summaries.items()},
    }
    return BenchResult(ID, TITLE, rows, details)


def _legs(events: list[Seen], wall0: int, legs: dict[str, list[int]]) -> None:
    """Split one task's path at its events' ``event_time`` (same clock as ``wall0``)."""
    times: dict[int, Seen] = {}
    for seen in events:
        if seen.type == spb.TASK_EVENT_TYPE_STATE_CHANGED:
            times.setdefault(seen.state, seen)
    pending = times.get(tpb.TASK_STATE_PENDING)
    running = times.get(tpb.TASK_STATE_RUNNING)
    done = times.get(tpb.TASK_STATE_SUCCEEDED)
    if pending is None or running is None or done is None:
        return
    points = [
        wall0,
        pending.event_time_ns,
        running.event_time_ns,
        done.event_time_ns,
        done.recv_wall_ns,
    ]
    for leg, start, end in zip(LEGS, points, points[1:], strict=False):
        legs[leg].append(end - start)
