"""Preemption and retries of llm.generate on a Hugging Face checkpoint (``--model``, CPU).

The checkpoint is made at test time (``hf_random.build_checkpoint``: a small Llama with
random weights and a byte-level BPE tokenizer), as in test_llm_hf.py. One server with
two engines: a preempted generation and one whose engine is SIGKILLed under a retry
policy both end with exactly the text of an uninterrupted run (greedy, and seeded
sampling for the preemption).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from tests.support import ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc
from tether_server.tasks import hf_random

from .helpers import (
    TaskStream,
    engines,
    full_task,
    llm_server,
    result_of,
    seconds,
    stream_token,
    submit,
    wait_pool,
    wait_terminal,
)

pytestmark = pytest.mark.llm

SHAPE = hf_random.Shape(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, context=1024)
PROMPT = "Hello wörld, 東京 says:"
TOKENS = 900
TIMEOUT = seconds(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("checkpoints")
    path = hf_random.build_checkpoint(root / "bpe", style="byte_bpe", shape=SHAPE, seed=1)
    yield from llm_server(
        tmp_path_factory,
        "preemption-hf",
        "--model",
        f"bpe={Path(path)}",
        "--preempt-min-runtime",
        "0s",
    )


def _args(temperature: float) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "model": "bpe",
        "max_tokens": TOKENS,
        "temperature": temperature,
        "seed": 7,
    }


def _done(tasks: task_service_pb2_grpc.TaskServiceStub, name: str) -> tuple[tpb.Task, Any]:
    task = full_task(tasks, name)
    assert task.state == tpb.TASK_STATE_SUCCEEDED, task.error
    return task, result_of(task)


@pytest.fixture(scope="module")
def references(tasks, cluster) -> dict[float, str]:  # type: ignore[no-untyped-def]
    wait_pool(cluster, 2)
    runs = {t: submit(tasks, "llm.generate", args=_args(t), timeout=TIMEOUT) for t in (0.0, 0.8)}
    for task in runs.values():
        wait_terminal(tasks, task.name, 300)
    return {t: _done(tasks, task.name)[1]["text"] for t, task in runs.items()}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_preempted_hf_generation_resumes_to_the_uninterrupted_text(  # type: ignore[no-untyped-def]
    tasks, cluster, references, temperature
):
    wait_pool(cluster, 2)
    token = stream_token(tasks)
    low = [
        submit(tasks, "llm.generate", args=_args(temperature), timeout=TIMEOUT, preemptible=True)
        for _ in range(2)
    ]
    streams = [TaskStream(tasks, task.name, resume_token=token) for task in low]
    try:
        for stream in streams:
            stream.wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=12)
        sent = time.monotonic()
        urgent = submit(tasks, "demo.sleep", args={"seconds": 0.3}, priority=10)
        # A sampled generation may reach EOS early and free its engine by itself.
        busy = all(
            tasks.GetTask(spb.GetTaskRequest(name=t.name), timeout=10).task.state
            != tpb.TASK_STATE_SUCCEEDED
            for t in low
        )
        running = wait_terminal(tasks, urgent.name, 30)
        assert running.state == tpb.TASK_STATE_SUCCEEDED
        assert time.monotonic() - sent < 30
        for stream in streams:
            stream.terminal(timeout=300)
    finally:
        for stream in streams:
            stream.close()
    preempted = []
    for task in low:
        done, result = _done(tasks, task.name)
        assert result["text"] == references[temperature]
        endings = [a.ending for a in done.attempts]
        if tpb.ATTEMPT_ENDING_PREEMPTED in endings:
            preempted.append(endings)
            assert endings == [tpb.ATTEMPT_ENDING_PREEMPTED, tpb.ATTEMPT_ENDING_FINAL]
            assert result["resumed_tokens"] > 0
    if busy:
        assert len(preempted) == 1, f"one urgent task preempts one generation: {preempted}"
    else:
        assert len(preempted) <= 1


def test_an_hf_generation_whose_engine_is_killed_resumes_elsewhere(  # type: ignore[no-untyped-def]
    tasks, cluster, references
):
    wait_pool(cluster, 2)
    policy = tpb.RetryPolicy(max_attempts=2, retry_on=["ENGINE_LOST"], initial_backoff=seconds(0))
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=_args(0.0), timeout=TIMEOUT, retry=policy)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        _, event = stream.wait_for(
            lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=30
        )
        victim = event.task.engine_id
        (pid,) = [e.pid for e in engines(cluster) if e.id == victim]
        os.kill(pid, signal.SIGKILL)
        stream.terminal(timeout=300)
    done, result = _done(tasks, task.name)
    assert [a.ending for a in done.attempts] == [
        tpb.ATTEMPT_ENDING_RETRIED,
        tpb.ATTEMPT_ENDING_FINAL,
    ]
    assert done.attempts[0].reason == "ENGINE_LOST"
    assert done.attempts[1].engine_id != victim
    assert result["resumed_tokens"] >= 8
    assert result["text"] == references[0.0]
