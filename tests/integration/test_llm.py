"""llm.generate on a real server (CPU, the ``tiny`` model): streaming, interrupt, resume, timeout.

One server for the module. Its LLM timeout policy is made tiny (``--llm-timeout-*``) so
the policy test ends in about a second; every other generation here gives its own
``timeout``, which the policy never overrides.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .helpers import (
    TaskStream,
    full_task,
    llm_server,
    result_of,
    seconds,
    stream_token,
    submit,
    usable_engines,
    wait_pool,
    wait_terminal,
)

pytestmark = pytest.mark.llm

RSS_TOLERANCE = 64 * 1024 * 1024
POLICY_BASE, POLICY_PER_TOKEN, POLICY_PER_CHAR = 0.5, 0.0002, 0.01
PROMPT = "Once upon a time"
SEED = 0  # with the tiny model and PROMPT, seed 0 at 0.8 runs to max_tokens without EOS
TOKENS = 600  # long enough to interrupt mid-way, short enough for a busy 2-core machine
EXPLICIT_TIMEOUT = seconds(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from llm_server(
        tmp_path_factory,
        "llm-server",
        "--rss-tolerance",
        f"{RSS_TOLERANCE // 2**20}MiB",
        "--llm-timeout-base",
        f"{POLICY_BASE}s",
        "--llm-timeout-per-token",
        f"{POLICY_PER_TOKEN}s",
        "--llm-timeout-per-prompt-char",
        f"{POLICY_PER_CHAR}s",
    )


def _args(temperature: float, max_tokens: int = TOKENS) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": SEED}


@dataclass(frozen=True)
class Interrupted:
    """An llm.generate interrupted mid-generation, and what the test saw of it."""

    task: tpb.Task
    engine_id: int
    seconds_to_terminal: float


class Generations:
    """Reference (uninterrupted) and interrupted runs, one of each per temperature."""

    def __init__(self, tasks: task_service_pb2_grpc.TaskServiceStub, cluster: Any) -> None:
        self.tasks = tasks
        self.cluster = cluster
        self._references: dict[float, tpb.Task] = {}
        self._interrupted: dict[float, Interrupted] = {}

    def warm_up(self) -> None:
        """Build the model on both engines (about a second each), outside any measurement."""
        wait_pool(self.cluster, 2)
        warm = [
            submit(self.tasks, "llm.generate", args=_args(0.0, 64), timeout=EXPLICIT_TIMEOUT)
            for _ in range(2)
        ]
        for task in warm:
            assert wait_terminal(self.tasks, task.name, 120).state == tpb.TASK_STATE_SUCCEEDED

    def reference(self, temperature: float) -> tpb.Task:
        if temperature not in self._references:
            task = submit(
                self.tasks, "llm.generate", args=_args(temperature), timeout=EXPLICIT_TIMEOUT
            )
            done = wait_terminal(self.tasks, task.name, 240)
            assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
            self._references[temperature] = full_task(self.tasks, task.name)
        return self._references[temperature]

    def interrupted(self, temperature: float) -> Interrupted:
        if temperature not in self._interrupted:
            self._interrupted[temperature] = self._interrupt_after(temperature, tokens=24)
        return self._interrupted[temperature]

    def _interrupt_after(self, temperature: float, tokens: int) -> Interrupted:
        wait_pool(self.cluster, 2)
        token = stream_token(self.tasks)
        task = submit(self.tasks, "llm.generate", args=_args(temperature), timeout=EXPLICIT_TIMEOUT)
        with TaskStream(self.tasks, task.name, resume_token=token) as stream:
            _, nth = stream.wait_for(
                lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=tokens
            )
            started = time.monotonic()
            self.tasks.InterruptTask(
                spb.InterruptTaskRequest(name=task.name, reason="test"), timeout=10
            )
            arrived, _ = stream.terminal(timeout=30)
        return Interrupted(full_task(self.tasks, task.name), nth.task.engine_id, arrived - started)


@pytest.fixture(scope="module")
def generations(tasks: Any, cluster: Any) -> Generations:
    runs = Generations(tasks, cluster)
    runs.warm_up()
    return runs


def test_generate_streams_its_text_while_it_runs(tasks, generations):  # type: ignore[no-untyped-def]
    wait_pool(generations.cluster, 2)
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=_args(0.0, 400), timeout=EXPLICIT_TIMEOUT)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        terminal_arrived, terminal = stream.terminal(timeout=120)
        outputs = stream.of_type(spb.TASK_EVENT_TYPE_OUTPUT)
    assert terminal.task.state == tpb.TASK_STATE_SUCCEEDED
    result = result_of(full_task(tasks, task.name))
    assert result["tokens"] == 400
    assert result["text"].isascii()  # greedy tiny text: one character per byte token
    chunks = [event.output_chunk for _, event in outputs]
    # One OUTPUT event per token, or per few tokens where the model is faster than the
    # runtime's 5 ms batching interval (the tiny model is: ~1 ms per token).
    assert 1 < len(chunks) <= 400 and all(chunks)
    assert "".join(chunks) == result["text"]
    assert all(event.task.state == tpb.TASK_STATE_RUNNING for _, event in outputs)
    revisions = [event.revision for _, event in outputs]
    assert revisions == sorted(set(revisions)) and revisions[-1] < terminal.revision
    # Streamed as produced, not delivered in a burst at the end: 400 tokens take half a
    # second or more on a CPU, and the chunks reached the subscriber over that time.
    first_arrived, last_arrived = outputs[0][0], outputs[-1][0]
    assert last_arrived - first_arrived > 0.2
    assert last_arrived <= terminal_arrived


def test_generate_interrupted_mid_generation_ends_interrupted_within_a_second(generations):  # type: ignore[no-untyped-def]
    run = generations.interrupted(0.0)
    assert run.task.state == tpb.TASK_STATE_INTERRUPTED
    assert run.task.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    assert run.seconds_to_terminal < 1.0, f"took {run.seconds_to_terminal:.3f}s"


def test_generate_interrupted_keeps_its_partial_text_a_prefix_of_the_full_run(generations):  # type: ignore[no-untyped-def]
    run = generations.interrupted(0.0)
    full_text = result_of(generations.reference(0.0))["text"]
    assert run.task.output, "the partial text is on the task"
    assert len(run.task.output) < len(full_text), "interrupted before the end"
    assert full_text.startswith(run.task.output)


def test_generate_interrupted_gives_its_memory_back_and_keeps_its_engine(generations):  # type: ignore[no-untyped-def]
    run = generations.interrupted(0.0)
    resources = run.task.resources
    assert resources.reclaimed, resources.summary
    assert resources.rss_before_bytes > 0
    assert resources.rss_after_bytes - resources.rss_before_bytes <= RSS_TOLERANCE
    assert not resources.engine_recycled
    time.sleep(0.5)  # a recycled engine would be STOPPING or LOST by now
    assert run.engine_id in {e.id for e in usable_engines(generations.cluster)}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generate_resumed_after_an_interrupt_yields_the_uninterrupted_text(  # type: ignore[no-untyped-def]
    tasks, generations, temperature
):
    interrupted = generations.interrupted(temperature)
    assert interrupted.task.state == tpb.TASK_STATE_INTERRUPTED
    assert interrupted.task.has_checkpoint
    full_text = result_of(generations.reference(temperature))["text"]
    resumed = submit(
        tasks,
        "llm.generate",
        args=_args(temperature),
        resume_from=interrupted.task.name,
        timeout=EXPLICIT_TIMEOUT,
    )
    done = wait_terminal(tasks, resumed.name, 240)
    assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
    assert done.resume_from == interrupted.task.name
    result = result_of(full_task(tasks, resumed.name))
    assert result["tokens"] == TOKENS
    assert result["text"] == full_text
    assert done.output == full_text


def test_generate_without_timeout_is_ended_by_the_llm_timeout_policy(tasks, generations):  # type: ignore[no-untyped-def]
    wait_pool(generations.cluster, 2)
    max_tokens = 1900  # several seconds of generation: far longer than the policy allows
    policy = POLICY_BASE + POLICY_PER_TOKEN * max_tokens + POLICY_PER_CHAR * len(PROMPT)
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=_args(0.0, max_tokens))
    assert task.timeout.ToNanoseconds() == pytest.approx(policy * 1e9, rel=1e-6)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        _, terminal = stream.terminal(timeout=60)
    ended = terminal.task
    assert ended.state == tpb.TASK_STATE_TIMED_OUT
    assert ended.interrupt.cause == tpb.INTERRUPT_CAUSE_TIMEOUT
    assert ended.error.reason == "TIMED_OUT"
    ran = ended.end_time.ToNanoseconds() - ended.start_time.ToNanoseconds()
    assert policy - 0.05 <= ran / 1e9 < policy + 5.0
