"""B5's baseline: a bare grpc.aio server-streaming fan-out, run as its own process.

    python -m bench.rawstream PORT

It does what tether's stream path does with none of tether around it: each
``/bench.Fanout/Subscribe`` call (request: a shard id, or ``*`` for every shard) gets a
bounded deque and a wake-up event; ``/bench.Fanout/Start`` (request:
``"<events/s> <seconds> <shards>"``) starts a producer that, for event ``k``, appends
``"<k> <shard> <time_ns>"`` to every matching subscriber, ``shard = (k // 3) % shards``
(three events per task, like a no-op's PENDING, RUNNING, SUCCEEDED). The first message
of every stream is ``ready``: the subscription is registered.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "bench.Fanout"
QUEUE_LIMIT = 1024


class _Subscriber:
    __slots__ = ("queue", "shard", "wakeup")

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.queue: collections.deque[bytes] = collections.deque()
        self.wakeup = asyncio.Event()


class Fanout:
    def __init__(self) -> None:
        self.subscribers: set[_Subscriber] = set()
        self.producer: asyncio.Task[None] | None = None

    async def subscribe(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        sub = _Subscriber(request.decode())
        self.subscribers.add(sub)
        try:
            yield b"ready"
            while True:
                while sub.queue:
                    yield sub.queue.popleft()
                sub.wakeup.clear()
                await sub.wakeup.wait()
        finally:
            self.subscribers.discard(sub)

    async def start(self, request: bytes, context: Any) -> bytes:
        rate, seconds, shards = request.decode().split()
        self.producer = asyncio.ensure_future(
            self._produce(float(rate), float(seconds), int(shards))
        )
        return b"ok"

    async def _produce(self, rate: float, seconds: float, shards: int) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for k in range(int(rate * seconds)):
            delay = start + k / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            shard = str((k // 3) % shards)
            message = f"{k} {shard} {time.time_ns()}".encode()
            for sub in self.subscribers:
                if sub.shard in ("*", shard) and len(sub.queue) < QUEUE_LIMIT:
                    sub.queue.append(message)
                    sub.wakeup.set()


async def serve(port: int) -> None:
    fanout = Fanout()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Subscribe": grpc.unary_stream_rpc_method_handler(fanout.subscribe),
            "Start": grpc.unary_unary_rpc_method_handler(fanout.start),
        },
    )
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"rawstream: serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
