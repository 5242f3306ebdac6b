"""B11, LLM per-token overhead: ``llm.generate`` tokens/s through tether against a raw loop.

Models: random-weight Llama checkpoints made here (``hf_random.build_checkpoint``), served
with ``--model``: ``b11-step`` (hidden 512, 10 layers: a 10-20 ms decode step on one core
of this box) for the target, and the tiny test shape (about 2 ms) for information.
tether: one engine (one torch thread), ``llm.generate`` greedy for N tokens; tokens/s =
N / (SubmitTask sent -> terminal event read on the stream): dispatch, prefill, every
chunk's trip to the subscriber and the result included.
Baseline: the same checkpoint loaded with transformers in this process (one torch
thread), the same greedy decode loop with a ``DynamicCache``: N / (prefill + N steps).
A B A B; the median of the per-pair ratios. Target: ratio >= 0.9 on ``b11-step``.
Also: InterruptTask -> INTERRUPTED read on the stream, during a generation (median).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tether.v1 import task_pb2 as tpb

from .harness import BenchResult, Row, Session, Summary, TetherServer, alternate, say
from .raw_decode import RawLoop
from .tether_client import TERMINAL, EventTap, in_state, run_label

ID = "B11"
TITLE = "LLM per-token overhead, llm.generate vs raw decode loop"
TARGET_RATIO = 0.9
PROMPT = "Once upon a time, in Köln,"


def _shapes() -> dict[str, Any]:
    from tether_server.tasks.hf_random import Shape

    return {
        "b11-step": Shape(
            hidden=512, layers=10, heads=8, kv_heads=4, intermediate=1408, context=2048
        ),
        "b11-tiny": Shape(context=2048),
    }


async def run(session: Session) -> BenchResult:
    import torch
    from transformers.utils import logging as hf_logging

    from tether_server.tasks.hf_random import build_checkpoint

    hf_logging.disable_progress_bar()

    tokens = session.size(200, 60)
    pairs = session.size(5, 2)
    interrupts = session.size(10, 3)
    root = session.workdir / "b11-models"
    paths = {
        name: await asyncio.to_thread(build_checkpoint, root / name, shape=shape, seed=3)
        for name, shape in _shapes().items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine: one torch thread
    os.environ["OMP_NUM_THREADS"] = "1"
    args = [arg for name, path in paths.items() for arg in ("--model", f"{name}={path}")]
    server = TetherServer(session.workdir / "b11-tether" / "data", engines=1, extra_args=args)
    rows: list[Row] = []
    details: dict[str, Any] = {"tokens": tokens, "pairs": pairs}
    try:
        client = await server.start()
        label = run_label()
        async with EventTap(client, {"run": label}, exclude_progress=True) as tap:
            for name, path in paths.items():
                raw_loop = await asyncio.to_thread(RawLoop, path, PROMPT)
                raw: list[float] = []
                through: list[float] = []
                engine_side: list[float] = []

                async def baseline(
                    i: int, raw_loop: RawLoop = raw_loop, raw: list[float] = raw
                ) -> None:
                    tps = await asyncio.to_thread(raw_loop.tokens_per_second, tokens)
                    if i >= 0:
                        raw.append(tps)

                async def tether(
                    i: int,
                    name: str = name,
                    through: list[float] = through,
                    engine_side: list[float] = engine_side,
                ) -> None:
                    started = time.perf_counter_ns()
                    task = await client.submit(
                        "llm.generate",
                        {"prompt": PROMPT, "model": name, "max_tokens": tokens},
                        labels={"run": label},
                    )
                    seen = await tap.wait(task.name, in_state(*TERMINAL), timeout=300)
                    elapsed = (seen.recv_ns - started) / 1e9
                    done = await client.get(task.name)
                    assert seen.state == tpb.TASK_STATE_SUCCEEDED, done.error
                    if i >= 0:
                        through.append(tokens / elapsed)
                        timings = done.result.struct_value.fields["timings"].struct_value
                        engine_side.append(timings.fields["tokens_per_second"].number_value)

                await alternate(pairs, baseline, tether, warmup=1)
                ratios = sorted(t / r for t, r in zip(through, raw, strict=True))
                ratio = ratios[len(ratios) // 2]
                base, ours = Summary.of(raw), Summary.of(through)
                say(
                    f"{name}: raw {base.median:.1f} tok/s ({1000 / base.median:.1f} ms/token), "
                    f"tether {ours.median:.1f} tok/s, ratio {ratio:.3f}"
                )
                target = name == "b11-step"
                met = ratio >= TARGET_RATIO if target else None
                rows.append(
                    Row(
                        ID,
                        f"tokens/s, {name} ({1000 / base.median:.1f} ms/token raw)",
                        base.median,
                        ours.median,
                        "tok/s",
                        f"{pairs} pairs x {tokens} tokens",
                        f"ratio >= {TARGET_RATIO}" if target else "-",
                        met,
                        ratio=ratio,
                        why="" if met in (True, None) else f"ratio {ratio:.3f} < {TARGET_RATIO}",
                    )
                )
                details[name] = {
                    "raw_tokens_per_second": raw,
                    "tether_tokens_per_second": through,
                    "engine_reported_tokens_per_second": engine_side,
                    "ratios": ratios,
                }
            latencies = await _interrupt_latencies(client, tap, label, interrupts)
        stats = Summary.of(latencies)
        rows.append(
            Row(
                ID,
                "InterruptTask -> INTERRUPTED, during generation",
                None,
                stats.median,
                "ms",
                str(interrupts),
                "-",
                None,
            )
        )
        details["interrupt_ms"] = stats.as_dict()
    finally:
        torch.set_num_threads(threads)
        await server.stop()
    return BenchResult(ID, TITLE, rows, details)


async def _interrupt_latencies(client: Any, tap: EventTap, label: str, count: int) -> list[float]:
    latencies: list[float] = []
    for _ in range(count):
        task = await client.submit(
            "llm.generate",
            {"prompt": PROMPT, "model": "b11-step", "max_tokens": 1000},
            labels={"run": label},
        )
        await tap.wait(task.name, in_state(tpb.TASK_STATE_RUNNING), timeout=120)
        await asyncio.sleep(0.5)  # well into the decode loop
        started = time.perf_counter_ns()
        await client.interrupt(task.name)
        seen = await tap.wait(task.name, in_state(*TERMINAL), timeout=60)
        latencies.append((seen.recv_ns - started) / 1e6)
        assert seen.state == tpb.TASK_STATE_INTERRUPTED, seen.state
    return latencies
