"""Retry policies in the control core: which endings run again, how often, after how long."""

from __future__ import annotations

import pytest

from tests.unit.test_machine import (
    add_engine,
    finish,
    fire,
    interrupt,
    make_core,
    new_task,
    of,
    start_running,
)
from tether_server.core.messages import (
    Dispatch,
    EngineLost,
    OutcomeStatus,
    Publish,
    StartTimer,
    TaskOutput,
    TimerKind,
)
from tether_server.core.model import (
    AttemptEnding,
    ErrorReason,
    EscalationStage,
    RetryPolicy,
    TaskState,
)
from tether_server.core.retry import backoff, retry_delay, validate_policy

ENGINE_LOST = ErrorReason.ENGINE_LOST
SIGINT = EscalationStage.SIGINT
POLICY = RetryPolicy(
    max_attempts=3,
    retry_on=frozenset({ErrorReason.ENGINE_LOST, ErrorReason.TASK_RAISED, ErrorReason.TIMED_OUT}),
    initial_backoff=1.0,
    max_backoff=10.0,
    multiplier=2.0,
    jitter=0.0,
)


def test_backoff_grows_by_the_multiplier_and_stops_at_the_cap() -> None:
    waits = [backoff(POLICY, n, lambda: 0.5) for n in range(1, 7)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_spreads_the_wait_evenly_around_it() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=4.0, max_backoff=100.0, jitter=0.25)
    assert backoff(policy, 1, lambda: 0.0) == pytest.approx(3.0)
    assert backoff(policy, 1, lambda: 0.5) == pytest.approx(4.0)
    assert backoff(policy, 1, lambda: 0.999999) == pytest.approx(5.0, rel=1e-5)


def test_a_reason_the_policy_does_not_name_is_final() -> None:
    task = new_task(retry=RetryPolicy(max_attempts=3, retry_on=frozenset({ENGINE_LOST})))
    assert retry_delay(task, ErrorReason.TASK_RAISED, lambda: 0.5) is None
    assert retry_delay(task, ENGINE_LOST, lambda: 0.5) is not None


def test_a_user_interrupt_or_a_cancellation_is_never_retried_whatever_the_policy_says() -> None:
    everything = frozenset(ErrorReason)
    task = new_task(retry=RetryPolicy(max_attempts=9, retry_on=everything))
    for reason in (ErrorReason.INTERRUPTED, ErrorReason.CANCELLED, ErrorReason.SHUTDOWN):
        assert retry_delay(task, reason, lambda: 0.5) is None


def test_validation_names_every_bad_field() -> None:
    bad = RetryPolicy(
        max_attempts=0,
        retry_on=frozenset({ErrorReason.INTERRUPTED}),
        initial_backoff=-1.0,
        max_backoff=-2.0,
        multiplier=0.5,
        jitter=2.0,
    )
    fields = [field for field, _ in validate_policy(bad)]
    assert fields == [
        "max_attempts",
        "retry_on",
        "initial_backoff",
        "max_backoff",
        "backoff_multiplier",
        "jitter",
    ]
    assert validate_policy(POLICY) == []


def test_engine_lost_under_a_policy_requeues_the_same_task_with_the_reason_on_its_attempt() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    out = core.handle(EngineLost(0, 3.0))
    task = core.tasks["t1"]
    assert task.state is TaskState.PENDING and task.attempt == 1 and task.engine_id is None
    (attempt,) = task.attempts
    assert attempt.ending is AttemptEnding.RETRIED and attempt.reason == "ENGINE_LOST"
    assert attempt.engine_id == 0 and attempt.end_time == 3.0
    # The stream shows why: the PENDING event carries the ended attempt.
    pending = [p for p in of(Publish, out) if p.task.state is TaskState.PENDING]
    assert pending[-1].task.attempts[-1].reason == "ENGINE_LOST"
    (timer,) = [t for t in of(StartTimer, out) if t.key.kind is TimerKind.RETRY]
    assert timer.delay == 1.0 and timer.key.attempt == 1
    assert core.queued_task_ids() == []  # waiting out its backoff


def test_the_retry_runs_as_the_next_attempt_once_its_backoff_is_over() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    core.handle(EngineLost(0, 3.0))
    add_engine(core, 1, now=3.5)
    out = fire(core, TimerKind.RETRY, attempt=1, now=4.0)
    assert of(Dispatch, out) == [Dispatch("t1", 2, 1)]
    task = core.tasks["t1"]
    assert task.state is TaskState.RUNNING and task.attempt == 2
    assert [a.attempt for a in task.attempts] == [1, 2]
    assert task.attempts[-1].ending is AttemptEnding.RUNNING


def test_a_retried_task_that_succeeds_closes_its_last_attempt_final() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    core.handle(EngineLost(0, 3.0))
    add_engine(core, 1)
    fire(core, TimerKind.RETRY, attempt=1, now=4.0)
    finish(core, attempt=2, now=6.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.SUCCEEDED
    assert [a.ending for a in task.attempts] == [AttemptEnding.RETRIED, AttemptEnding.FINAL]


def test_max_attempts_counts_failures_and_the_last_one_is_final() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    for attempt in (1, 2):
        finish(core, status=OutcomeStatus.FAILED, attempt=attempt, error_type="ValueError")
        fire(core, TimerKind.RETRY, attempt=attempt, now=20.0 * attempt)
        assert core.tasks["t1"].attempt == attempt + 1
    finish(core, status=OutcomeStatus.FAILED, attempt=3, error_type="ValueError", now=99.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.FAILED and task.error is not None
    assert task.error.reason is ErrorReason.TASK_RAISED
    assert [a.ending for a in task.attempts] == [
        AttemptEnding.RETRIED,
        AttemptEnding.RETRIED,
        AttemptEnding.FINAL,
    ]


def test_backoff_doubles_from_one_retry_to_the_next() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    out1 = finish(core, status=OutcomeStatus.FAILED, attempt=1)
    fire(core, TimerKind.RETRY, attempt=1, now=20.0)
    out2 = finish(core, status=OutcomeStatus.FAILED, attempt=2)
    delays = [t.delay for t in of(StartTimer, out1 + out2) if t.key.kind is TimerKind.RETRY]
    assert delays == [1.0, 2.0]


def test_the_jitter_comes_from_the_injected_random_source() -> None:
    core = make_core(uniform=lambda: 1.0)
    policy = RetryPolicy(max_attempts=2, retry_on=frozenset({ENGINE_LOST}), jitter=0.5)
    start_running(core, retry=policy)
    out = core.handle(EngineLost(0, 3.0))
    (timer,) = [t for t in of(StartTimer, out) if t.key.kind is TimerKind.RETRY]
    assert timer.delay == pytest.approx(1.5)


def test_a_user_interrupt_under_a_policy_retrying_everything_ends_the_task() -> None:
    core = make_core()
    everything = RetryPolicy(max_attempts=5, retry_on=frozenset(ErrorReason))
    start_running(core, retry=everything)
    interrupt(core)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT)
    task = core.tasks["t1"]
    assert task.state is TaskState.INTERRUPTED and task.attempt == 1
    assert task.attempts[-1].ending is AttemptEnding.FINAL


def test_a_timeout_the_policy_retries_runs_again() -> None:
    core = make_core()
    start_running(core, retry=POLICY, timeout=5.0)
    fire(core, TimerKind.TIMEOUT, now=5.0)
    finish(core, status=OutcomeStatus.INTERRUPTED, stage=SIGINT, now=5.1)
    task = core.tasks["t1"]
    assert task.state is TaskState.PENDING
    assert task.attempts[-1].reason == "TIMED_OUT"
    assert task.interrupt is None  # the next attempt starts with a clean record


def test_interrupting_a_task_waiting_out_its_backoff_cancels_it() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    core.handle(EngineLost(0, 3.0))
    interrupt(core, now=3.5)
    assert core.tasks["t1"].state is TaskState.CANCELLED
    add_engine(core, 1)
    assert of(Dispatch, fire(core, TimerKind.RETRY, attempt=1, now=4.0)) == []


def test_a_new_attempt_starts_with_no_output_of_its_own() -> None:
    core = make_core()
    start_running(core, retry=POLICY)
    core.handle(TaskOutput("t1", 1, "hello", 1.0))
    core.handle(EngineLost(0, 3.0))
    assert core.tasks["t1"].output == ""


def test_a_restart_requeues_a_running_task_whose_policy_retries_cluster_loss() -> None:
    old = make_core()
    policy = RetryPolicy(max_attempts=2, retry_on=frozenset({ErrorReason.CLUSTER_LOST}))
    start_running(old, retry=policy)
    saved = old.tasks["t1"]
    core = make_core()
    out = core.restore([saved], now=50.0)
    task = core.tasks["t1"]
    assert task.state is TaskState.PENDING
    assert task.attempts[-1].reason == "CONTROLLER_RESTARTED"
    assert [t.key.kind for t in of(StartTimer, out)] == [TimerKind.RETRY]


def test_a_restart_ends_a_running_task_without_a_policy() -> None:
    old = make_core()
    start_running(old)
    core = make_core()
    core.restore([old.tasks["t1"]], now=50.0)
    assert core.tasks["t1"].state is TaskState.FAILED


def test_a_zero_backoff_queues_the_retry_at_once() -> None:
    core = make_core(target_engines=2)
    policy = RetryPolicy(
        max_attempts=2, retry_on=frozenset({ENGINE_LOST}), initial_backoff=0.0, max_backoff=0.0
    )
    add_engine(core, 1)
    start_running(core, retry=policy)
    out = core.handle(EngineLost(0, 3.0))
    assert of(Dispatch, out) == [Dispatch("t1", 2, 1)]
    assert core.tasks["t1"].attempts[0].engine_id == 0


def test_server_flags_set_the_default_policy_and_the_preemption_settings() -> None:
    from tether_server.flags import parse_args

    config, _ = parse_args(
        [
            "--retry-max-attempts",
            "4",
            "--retry-on",
            "task_raised,ENGINE_LOST",
            "--retry-initial-backoff",
            "500ms",
            "--preemptible-tasks",
            "llm.generate,demo.sleep",
            "--preempt-min-runtime",
            "3s",
        ]
    )
    assert config.retry.max_attempts == 4
    assert config.retry.retry_on == {ErrorReason.TASK_RAISED, ENGINE_LOST}
    assert config.retry.initial_backoff == 0.5
    assert config.preemptible_tasks == ("llm.generate", "demo.sleep")
    assert config.preempt_min_runtime == 3.0
    default, _ = parse_args([])
    assert default.retry.max_attempts == 1  # off by default
    assert default.preemptible_tasks == ()


@pytest.mark.parametrize(
    "argv",
    [["--retry-on", "INTERRUPTED"], ["--retry-on", "NOPE"], ["--retry-jitter", "2"]],
)
def test_server_flags_refuse_a_bad_default_policy(argv: list[str]) -> None:
    from tether_server.flags import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
