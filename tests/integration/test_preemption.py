"""Work is never thrown away: preemption and retries of llm.generate on a real server.

One server with two engines for the module (the ``tiny`` demo model on the CPU).
Every engine is made busy with a low-priority, preemptible generation; urgent tasks
arrive and run within the SIGINT grace plus a dispatch; the preempted generations
resume from their checkpoints and end with exactly the text of an uninterrupted run
(temperature 0, and seeded sampling at 0.8). An engine killed with SIGKILL under a
task with a retry policy: the task resumes on another engine and succeeds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import ServerProcess, wait_until
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .helpers import (
    TaskStream,
    engines,
    error_info,
    full_task,
    llm_server,
    result_of,
    seconds,
    stream_token,
    submit,
    wait_pool,
    wait_state,
    wait_terminal,
)

pytestmark = pytest.mark.llm

SIGINT_GRACE = 0.5  # FAST_GRACE, which llm_server gives
PROMPT = "Once upon a time"
TOKENS = 1800  # several seconds of generation on a CPU: long enough to preempt mid-way
TIMEOUT = seconds(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from llm_server(
        tmp_path_factory,
        "preemption",
        "--preemptible-tasks",
        "llm.generate",
        "--preempt-min-runtime",
        "0s",
    )


def _args(temperature: float, max_tokens: int = TOKENS) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": temperature, "seed": 0}


@pytest.fixture(scope="module")
def references(
    tasks: task_service_pb2_grpc.TaskServiceStub,
    cluster: cluster_service_pb2_grpc.ClusterServiceStub,
) -> dict[float, str]:
    """The uninterrupted texts, one per temperature (run side by side, not preemptible)."""
    wait_pool(cluster, 2)
    runs = {
        t: submit(tasks, "llm.generate", args=_args(t), timeout=TIMEOUT, preemptible=False)
        for t in (0.0, 0.8)
    }
    texts = {}
    for temperature, task in runs.items():
        done = wait_terminal(tasks, task.name, 300)
        assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
        assert not done.preemptible
        texts[temperature] = result_of(full_task(tasks, task.name))["text"]
    return texts


def test_a_task_name_listed_by_the_server_is_preemptible_by_default(tasks):  # type: ignore[no-untyped-def]
    task = submit(tasks, "llm.generate", args=_args(0.0, 4), timeout=TIMEOUT)
    assert task.preemptible
    other = submit(tasks, "demo.echo", args={"value": 1})
    assert not other.preemptible
    wait_terminal(tasks, task.name, 120)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (tpb.RetryPolicy(max_attempts=1000), "retry.max_attempts"),
        (tpb.RetryPolicy(max_attempts=2, retry_on=["INTERRUPTED"]), "retry.retry_on"),
        (tpb.RetryPolicy(max_attempts=2, retry_on=["NOPE"]), "retry.retry_on[0]"),
        (tpb.RetryPolicy(max_attempts=2, jitter=1.5), "retry.jitter"),
        (tpb.RetryPolicy(max_attempts=2, backoff_multiplier=0.5), "retry.backoff_multiplier"),
    ],
)
def test_a_bad_retry_policy_is_refused_with_the_field_named(tasks, policy, field):  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        submit(tasks, "demo.echo", args={"value": 1}, retry=policy)
    code, reason, _, fields = error_info(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_RETRY_POLICY"
    assert field in fields


def test_preempted_generations_resume_and_end_with_the_uninterrupted_text(  # type: ignore[no-untyped-def]
    tasks, cluster, references
):
    wait_pool(cluster, 2)
    token = stream_token(tasks)
    low = {
        t: submit(tasks, "llm.generate", args=_args(t), timeout=TIMEOUT, priority=0)
        for t in (0.0, 0.8)
    }
    streams = {t: TaskStream(tasks, task.name, resume_token=token) for t, task in low.items()}
    try:
        for stream in streams.values():  # both engines busy, both generations well started
            stream.wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=24)
        urgent_token = stream_token(tasks)
        sent = time.monotonic()
        urgent = [submit(tasks, "demo.sleep", args={"seconds": 0.3}, priority=10) for _ in range(2)]
        latencies = []
        for task in urgent:
            with TaskStream(tasks, task.name, resume_token=urgent_token) as stream:
                arrived, _ = stream.wait_for(
                    lambda e: e.task.state == tpb.TASK_STATE_RUNNING, timeout=30
                )
            latencies.append(arrived - sent)
        # SIGINT ends a decode step in milliseconds; the budget is the grace plus a dispatch
        # on a loaded two-core box.
        assert max(latencies) < SIGINT_GRACE + 1.5, latencies
        for stream in streams.values():
            stream.terminal(timeout=300)
    finally:
        for stream in streams.values():
            stream.close()
    for temperature, task in low.items():
        done = full_task(tasks, task.name)
        assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
        assert done.attempt == 2
        endings = [a.ending for a in done.attempts]
        assert endings == [tpb.ATTEMPT_ENDING_PREEMPTED, tpb.ATTEMPT_ENDING_FINAL]
        assert done.attempts[0].reason == "PREEMPTED"
        assert done.attempts[0].ended_by in {u.name for u in urgent}
        result = result_of(done)
        assert result["resumed_tokens"] > 0, "the second attempt started from the checkpoint"
        assert result["text"] == references[temperature]
        assert done.output == references[temperature]
    for task in urgent:
        assert wait_terminal(tasks, task.name).state == tpb.TASK_STATE_SUCCEEDED


def test_a_generation_whose_engine_is_killed_resumes_on_another_engine(  # type: ignore[no-untyped-def]
    tasks, cluster, references
):
    wait_pool(cluster, 2)
    policy = tpb.RetryPolicy(
        max_attempts=3, retry_on=["ENGINE_LOST"], initial_backoff=seconds(0.1), jitter=0.0
    )
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=_args(0.0), timeout=TIMEOUT, retry=policy)
    assert task.retry.max_attempts == 3
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        _, event = stream.wait_for(
            lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=40
        )
        victim = event.task.engine_id
        (pid,) = [e.pid for e in engines(cluster) if e.id == victim]
        os.kill(pid, signal.SIGKILL)
        _, requeued = stream.wait_for(
            lambda e: e.task.state == tpb.TASK_STATE_PENDING and len(e.task.attempts) == 1,
            timeout=30,
        )
        assert requeued.task.attempts[0].reason == "ENGINE_LOST"
        stream.terminal(timeout=300)
    done = full_task(tasks, task.name)
    assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
    first, second = done.attempts
    assert first.ending == tpb.ATTEMPT_ENDING_RETRIED and first.engine_id == victim
    assert second.ending == tpb.ATTEMPT_ENDING_FINAL and second.engine_id != victim
    result = result_of(done)
    assert result["resumed_tokens"] >= 8, "resumed from a periodic checkpoint"
    assert result["text"] == references[0.0]


def test_attempts_survive_a_restart_of_the_server(  # type: ignore[no-untyped-def]
    server, tasks, cluster
):
    wait_pool(cluster, 2)
    policy = tpb.RetryPolicy(max_attempts=2, retry_on=["TASK_RAISED"], initial_backoff=seconds(0))
    task = submit(tasks, "demo.fail", args={}, retry=policy)
    done = wait_terminal(tasks, task.name, 60)
    assert done.state == tpb.TASK_STATE_FAILED
    assert [a.ending for a in done.attempts] == [
        tpb.ATTEMPT_ENDING_RETRIED,
        tpb.ATTEMPT_ENDING_FINAL,
    ]
    server.stop()
    server.start()
    with grpc.insecure_channel(server.address) as ch:
        again = task_service_pb2_grpc.TaskServiceStub(ch)
        restored = again.GetTask(spb.GetTaskRequest(name=task.name), timeout=10).task
    assert list(restored.attempts) == list(done.attempts)
    assert restored.retry == done.retry


def stored_state(data: Path, name: str) -> str | None:
    """The state of task ``name`` in the server's store file, as committed."""
    with contextlib.closing(
        sqlite3.connect(f"file:{data / 'tether.sqlite3'}?mode=ro", uri=True)
    ) as conn:
        row = conn.execute(
            "SELECT state FROM tasks WHERE id = ?", (name.removeprefix("tasks/"),)
        ).fetchone()
    return None if row is None else str(row[0])


def test_a_task_running_when_the_server_is_killed_runs_again_under_a_cluster_loss_policy(  # type: ignore[no-untyped-def]
    tmp_path,
):
    data = tmp_path / "data"
    first = ServerProcess(data, engines=1)
    policy = tpb.RetryPolicy(
        max_attempts=2, retry_on=["CLUSTER_LOST"], initial_backoff=seconds(0.1)
    )
    try:
        first.start()
        with grpc.insecure_channel(first.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            task = submit(stub, "demo.sleep", args={"seconds": 0.5}, retry=policy)
            wait_state(stub, task.name, {tpb.TASK_STATE_RUNNING})
        # RUNNING is streamed before its record is committed (write-behind): kill once
        # the store holds it, so that the restart knows the attempt was dispatched.
        wait_until(lambda: stored_state(data, task.name) == "RUNNING", timeout=10)
        first.kill()  # SIGKILL: the embedded cluster goes with the attempt
        second = ServerProcess(data, port=first.port, engines=1)
        with second, grpc.insecure_channel(second.address) as ch:
            stub = task_service_pb2_grpc.TaskServiceStub(ch)
            done = wait_terminal(stub, task.name, 60)
            assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
            first_attempt, second_attempt = done.attempts
            assert first_attempt.ending == tpb.ATTEMPT_ENDING_RETRIED
            assert first_attempt.reason == "CONTROLLER_RESTARTED"
            assert second_attempt.ending == tpb.ATTEMPT_ENDING_FINAL
    finally:
        first.kill_leftovers()
