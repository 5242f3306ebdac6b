"""B1, interrupt latency of a cooperative task (one ``time.sleep`` call).

tether: ``InterruptTask`` sent -> INTERRUPTED read from a stream; the task is
``demo.sleep(60)``, interrupted 0.2 s after its RUNNING event.
Baseline: raw ``Client.send_signal(SIGINT)`` -> ``AsyncResult`` done, on the same body
(one ``time.sleep(60)``), 0.2 s after the engine said ``status: busy``.
Targets: median ratio <= 1.0 (stretch 0.5); tether p99 <= 60 ms.
"""

from __future__ import annotations

import asyncio
import signal

from tether.v1 import task_pb2 as tpb

from .engine_tasks import long_sleep
from .harness import BenchResult, Row, Session, Summary, alternate, now_ns, say
from .tether_client import TERMINAL, EventTap, in_state, run_label, state_name

ID = "B1"
TITLE = "interrupt latency, cooperative task"
TARGET_RATIO = 1.0
STRETCH_RATIO = 0.5
TARGET_P99_MS = 60.0
SETTLE_S = 0.2
"""Time between 'the task runs' and the interrupt, on both sides."""


async def _wait_busy(raw_client: object, msg_id: str, timeout: float = 30.0) -> None:
    """Until the engine's IOPub ``status: busy`` for ``msg_id`` reached the client."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    metadata = raw_client.metadata  # type: ignore[attr-defined]
    while loop.time() < deadline:
        md = metadata.get(msg_id)
        if md is not None and md.get("engine_id") is not None:
            return
        await asyncio.sleep(0.002)
    raise TimeoutError("raw task never started")


async def run(session: Session) -> BenchResult:
    pairs = session.size(40, 6)
    warmup = session.size(3, 1)
    raw = await session.raw()
    tether = await session.tether()
    label = run_label()
    raw_ns: list[int] = []
    ack_ns: list[int] = []
    tether_ns: list[int] = []
    reply_ns: list[int] = []
    stage_sigint = 0

    async with EventTap(tether, {"bench": label}) as tap:

        async def baseline(i: int) -> None:
            engine = abs(i) % 2
            ar = raw.view(engine).apply_async(long_sleep, 60.0)
            await _wait_busy(raw.client, ar.msg_ids[0])
            await asyncio.sleep(SETTLE_S)
            t0 = now_ns()
            ack = raw.client.send_signal(signal.SIGINT, targets=engine, block=False)
            acked: list[int] = []
            ack.add_done_callback(lambda _f: acked.append(now_ns()))  # on the client's IO thread
            ar.wait(30)
            t1 = now_ns()
            if not ar.ready() or ar.successful():
                raise RuntimeError("the raw SIGINT did not end the task")
            ack.result(10)
            if i >= 0:
                raw_ns.append(t1 - t0)
                ack_ns.append(acked[0] - t0)

        async def with_tether(i: int) -> None:
            nonlocal stage_sigint
            task = await tether.submit("demo.sleep", {"seconds": 60.0}, labels={"bench": label})
            await tap.wait(task.name, in_state(tpb.TASK_STATE_RUNNING))
            await asyncio.sleep(SETTLE_S)
            t0 = now_ns()
            await tether.interrupt(task.name)
            t_reply = now_ns()
            ended = await tap.wait(task.name, in_state(*TERMINAL), timeout=30)
            if ended.state != tpb.TASK_STATE_INTERRUPTED:
                raise RuntimeError(f"{task.name} ended {state_name(ended.state)}")
            stage_sigint += ended.stage == tpb.ESCALATION_STAGE_SIGINT
            tap.forget(task.name)
            if i >= 0:
                tether_ns.append(ended.recv_ns - t0)
                reply_ns.append(t_reply - t0)

        await alternate(pairs, baseline, with_tether, warmup=warmup)

    base, teth = Summary.of_ns(raw_ns), Summary.of_ns(tether_ns)
    ack, reply = Summary.of_ns(ack_ns), Summary.of_ns(reply_ns)
    say(f"raw send_signal(SIGINT) -> AsyncResult done:   {base.text()}")
    say(f"  of which the nanny's ack:                    {ack.text()}")
    say(f"tether InterruptTask -> INTERRUPTED on stream: {teth.text()}")
    say(f"  of which InterruptTask reply:                {reply.text()}")
    ratio = teth.median / base.median
    samples = f"{base.n}+{teth.n}"
    ratio_met = ratio <= TARGET_RATIO
    p99_met = teth.p99 <= TARGET_P99_MS
    stretch = "stretch met" if ratio <= STRETCH_RATIO else f"stretch {STRETCH_RATIO} not met"
    say(f"median ratio {ratio:.2f} ({stretch}); p99 {teth.p99:.1f} ms")
    rows = [
        Row(
            ID,
            "median interrupt -> INTERRUPTED",
            base.median,
            teth.median,
            "ms",
            samples,
            f"ratio <= {TARGET_RATIO} (stretch {STRETCH_RATIO})",
            ratio_met,
            why="" if ratio_met else f"median ratio {ratio:.2f} > {TARGET_RATIO}",
        ),
        Row(
            ID,
            "p99 interrupt -> INTERRUPTED",
            base.p99,
            teth.p99,
            "ms",
            samples,
            f"p99 <= {TARGET_P99_MS:.0f} ms",
            p99_met,
            why="" if p99_met else f"p99 {teth.p99:.1f} ms > {TARGET_P99_MS:.0f} ms",
        ),
    ]
    details = {
        "raw_ms": base.as_dict(),
        "tether_ms": teth.as_dict(),
        "raw_nanny_ack_ms": ack.as_dict(),
        "interrupt_reply_ms": reply.as_dict(),
        "ended_at_sigint_stage": stage_sigint,
        "settle_seconds": SETTLE_S,
    }
    return BenchResult(ID, TITLE, rows, details)
