"""B6, the progress path: ``ctx.emit`` in the engine -> the chunk read by a subscriber.

tether: ``bench.stamped_count`` (``demo.count`` whose chunks carry the engine's wall
clock at ``ctx.emit``, see bench/tether_tasks.py) emits every 10 ms; a filter stream
reads the OUTPUT events. Latency = receive wall clock - stamp. It splits into
engine -> controller (the event's ``event_time`` - stamp) and controller -> subscriber
(receive - ``event_time``), the leg ``demo.count``'s events alone would show.
Baseline: raw ``publish_data`` at the same pace, read from a zmq SUB socket on the raw
cluster's IOPub channel (the way tether's controller reads it).
Target: tether median < 5 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .engine_tasks import stamped_publish
from .harness import MS, BenchResult, RawCluster, Row, Session, Summary, alternate, say
from .tether_client import EventTap, in_state, run_label

ID = "B6"
TITLE = "progress path, ctx.emit -> subscriber"
TARGET_MEDIAN_MS = 5.0
INTERVAL_S = 0.01


class IOPubReader:
    """An independent SUB socket on a raw cluster's IOPub: every ``publish_data``."""

    def __init__(self, raw: RawCluster) -> None:
        import zmq
        import zmq.asyncio
        from jupyter_client.session import Session as JupyterSession

        cfg = raw.client._config
        self.session = JupyterSession(
            key=cfg["key"].encode(),
            signature_scheme=cfg["signature_scheme"],
            packer=cfg["pack"],
            unpacker=cfg["unpack"],
        )
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(cfg["iopub"])
        self.received: list[tuple[int, int, int]] = []
        """(seq, sent wall ns, received wall ns)"""
        self._task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        from ipyparallel.serialize import deserialize_object

        while True:
            frames = await self.socket.recv_multipart(copy=False)
            recv = time.time_ns()
            _idents, msg_frames = self.session.feed_identities(frames, copy=False)
            msg = self.session.deserialize(msg_frames, content=True, copy=False)
            if msg["header"]["msg_type"] != "data_message":
                continue
            data, _ = deserialize_object(msg["buffers"])
            if isinstance(data, dict) and "bench_sent_ns" in data:
                self.received.append((int(data["bench_seq"]), int(data["bench_sent_ns"]), recv))

    def __enter__(self) -> IOPubReader:
        self._task = asyncio.ensure_future(self._read())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.socket.close(linger=0)
        self.context.term()


async def run(session: Session) -> BenchResult:
    blocks = session.size(4, 2)
    per_block = session.size(60, 25)
    raw = await session.raw()
    tether = await session.tether()
    label = run_label()
    raw_ms: list[float] = []
    full_ms: list[float] = []
    engine_leg_ms: list[float] = []
    server_leg_ms: list[float] = []
    lost = {"raw": 0, "tether": 0}

    await asyncio.sleep(0)
    with IOPubReader(raw) as reader:
        await asyncio.sleep(0.2)  # SUB sockets drop what comes before they are connected

        async def baseline(i: int) -> None:
            n = per_block if i >= 0 else 5
            reader.received.clear()
            ar = raw.view(0).apply_async(stamped_publish, n, INTERVAL_S)
            await asyncio.wrap_future(ar)
            deadline = time.monotonic() + 2
            while len(reader.received) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if i >= 0:
                raw_ms.extend((recv - sent) / MS for _seq, sent, recv in reader.received)
                lost["raw"] += n - len(reader.received)

        async with EventTap(tether, {"bench": label}) as tap:

            async def with_tether(i: int) -> None:
                n = per_block if i >= 0 else 5
                task = await tether.submit(
                    "bench.stamped_count", {"n": n, "interval": INTERVAL_S}, labels={"bench": label}
                )
                await tap.wait(task.name, in_state(tpb.TASK_STATE_SUCCEEDED), timeout=60)
                outputs = [
                    s for s in tap.seen.get(task.name, []) if s.type == spb.TASK_EVENT_TYPE_OUTPUT
                ]
                tap.forget(task.name)
                if i < 0:
                    return
                lost["tether"] += n - len(outputs)
                for seen in outputs:
                    stamp = _stamp(seen.chunk)
                    if stamp is None:
                        continue
                    full_ms.append((seen.recv_wall_ns - stamp) / MS)
                    engine_leg_ms.append((seen.event_time_ns - stamp) / MS)
                    server_leg_ms.append((seen.recv_wall_ns - seen.event_time_ns) / MS)

            await alternate(blocks, baseline, with_tether, warmup=1)

    base, full = Summary.of(raw_ms), Summary.of(full_ms)
    eng, srv = Summary.of(engine_leg_ms), Summary.of(server_leg_ms)
    say(f"raw publish_data -> own IOPub SUB:             {base.text()}")
    say(f"tether ctx.emit -> OUTPUT event at subscriber: {full.text()}")
    say(f"  engine -> controller (event_time - stamp):   {eng.text()}")
    say(f"  controller -> subscriber (recv - event_time): {srv.text()}")
    say(f"messages missing: raw {lost['raw']}, tether {lost['tether']}")
    met = full.median < TARGET_MEDIAN_MS
    samples = f"{base.n}+{full.n}"
    rows = [
        Row(
            ID,
            "median emit -> chunk at subscriber",
            base.median,
            full.median,
            "ms",
            samples,
            f"median < {TARGET_MEDIAN_MS:.0f} ms",
            met,
            why="" if met else f"median {full.median:.2f} ms >= {TARGET_MEDIAN_MS:.0f} ms",
        ),
        Row(ID, "p99 emit -> chunk at subscriber", base.p99, full.p99, "ms", samples, "-", None),
    ]
    details = {
        "raw_ms": base.as_dict(),
        "tether_ms": full.as_dict(),
        "engine_to_controller_ms": eng.as_dict(),
        "controller_to_subscriber_ms": srv.as_dict(),
        "missing": lost,
        "interval_s": INTERVAL_S,
    }
    return BenchResult(ID, TITLE, rows, details)


def _stamp(chunk: str) -> int | None:
    with contextlib.suppress(ValueError, IndexError):
        return int(chunk.split()[1])
    return None
