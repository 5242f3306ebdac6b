"""``run_task`` and the signal guard in this process: real signals, no cluster.

Each test installs tether's SIGINT/SIGTERM handlers in the pytest process (main thread)
and puts the previous handlers back afterwards. Signals come from a timer thread with
``os.kill(os.getpid(), ...)``, as the engine's nanny would send them.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import psutil
import pytest

from tether_server.runtime import TaskContext, run_task, task
from tether_server.runtime.guard import GUARD, TaskSignals, call_task
from tether_server.runtime.registry import load_modules, unregister

load_modules(["tether_server.tasks.demo"])

pytestmark = pytest.mark.timeout(60)


class Payload:
    """Something a task holds in a local variable, to see whether it outlives the task."""


_payloads: list[weakref.ref[Payload]] = []


def hold_object(seconds: float) -> None:
    payload = Payload()
    _payloads.append(weakref.ref(payload))
    time.sleep(seconds)


def returns_set() -> Any:
    return {1, 2}


def exits() -> None:
    sys.exit(3)


def hooks(ctx: TaskContext, seconds: float, slow_hook: float = 0.0) -> None:
    ctx.on_interrupt(lambda: ctx.emit("[hook] first registered, runs last\n"))

    def broken() -> None:
        raise ValueError("hook broke")

    ctx.on_interrupt(broken)
    if slow_hook:
        ctx.on_interrupt(lambda: time.sleep(slow_hook))
    time.sleep(seconds)


def replaces_sigint_handler() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)


_TEST_TASKS: dict[str, Callable[..., Any]] = {
    "unit.hold_object": hold_object,
    "unit.returns_set": returns_set,
    "unit.exits": exits,
    "unit.hooks": hooks,
    "unit.replaces_sigint_handler": replaces_sigint_handler,
}


@pytest.fixture(autouse=True, scope="module")
def _registered_test_tasks() -> Iterator[None]:
    """Register this module's throwaway tasks only while its tests run."""
    for name, function in _TEST_TASKS.items():
        task(name)(function)
    yield
    for name in _TEST_TASKS:
        unregister(name)


@pytest.fixture
def guard() -> Iterator[list[int]]:
    """Install the guard over a recording SIGTERM handler; yields what that handler saw."""
    seen: list[int] = []

    def previous_sigterm(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    original_int = signal.getsignal(signal.SIGINT)
    original_term = signal.signal(signal.SIGTERM, previous_sigterm)
    GUARD.install()
    try:
        yield seen
    finally:
        GUARD.uninstall()
        signal.signal(signal.SIGINT, original_int)
        signal.signal(signal.SIGTERM, original_term)


def spec(name: str, **args: Any) -> dict[str, Any]:
    return {
        "task_id": "t",
        "attempt": 0,
        "task": name,
        "args": args,
        "resume_state": None,
        "max_output_chars": 4096,
        "rss_tolerance_bytes": 64 << 20,
        "gpu_tolerance_bytes": 0,
    }


def signal_later(*steps: tuple[float, int]) -> list[threading.Timer]:
    timers = [threading.Timer(at, os.kill, (os.getpid(), sig)) for at, sig in steps]
    for timer in timers:
        timer.start()
    return timers


def run_with_signals(
    task_spec: dict[str, Any], *steps: tuple[float, int]
) -> tuple[dict[str, Any], float]:
    timers = signal_later(*steps)
    started = time.monotonic()
    try:
        outcome = run_task(task_spec)
    finally:
        for timer in timers:
            timer.cancel()
    return outcome, time.monotonic() - started


# --------------------------------------------------------------------------- tests
def test_sigint_interrupts_the_running_task_and_runs_its_hook(guard: list[int]) -> None:
    outcome, took = run_with_signals(spec("demo.sleep", seconds=10), (0.1, signal.SIGINT))
    assert took < 2
    assert (outcome["status"], outcome["stage"], outcome["hooks_run"]) == (
        "interrupted",
        "SIGINT",
        1,
    )
    assert outcome["output"] == "[on_interrupt] demo.sleep cleaned up\n"
    assert outcome["traceback"].splitlines()[-1] == "KeyboardInterrupt"
    assert "tether_server/runtime" not in outcome["traceback"]


def test_sigint_while_no_task_is_armed_does_nothing(guard: list[int]) -> None:
    ignored = GUARD.ignored_sigints
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs here; it must not raise
    assert GUARD.ignored_sigints == ignored + 1


def test_sigterm_while_no_task_is_armed_goes_to_the_previous_handler(guard: list[int]) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert guard == [signal.SIGTERM]


def test_sigterm_while_armed_ends_the_task_and_not_the_engine(guard: list[int]) -> None:
    outcome, _ = run_with_signals(
        spec("demo.stubborn", seconds=10), (0.1, signal.SIGINT), (0.3, signal.SIGTERM)
    )
    assert (outcome["status"], outcome["stage"], outcome["error_type"]) == (
        "interrupted",
        "SIGTERM",
        "TaskTerminated",
    )
    assert "[stubborn] ignoring KeyboardInterrupt" in outcome["output"]
    assert guard == []  # the previous handler (ipyparallel's engine stop) was not called


def test_uninterruptible_block_defers_sigint_to_its_end(guard: list[int]) -> None:
    outcome, took = run_with_signals(
        spec("demo.uninterruptible", seconds=0.5, after=5), (0.1, signal.SIGINT)
    )
    assert took >= 0.5
    assert took < 2
    assert outcome["status"] == "interrupted"
    assert "[uninterruptible] block finished" in outcome["output"]


def test_sigterm_is_not_deferred_by_uninterruptible_blocks(guard: list[int]) -> None:
    outcome, took = run_with_signals(
        spec("demo.uninterruptible", seconds=10), (0.1, signal.SIGINT), (0.2, signal.SIGTERM)
    )
    assert took < 2
    assert outcome["stage"] == "SIGTERM"
    assert "block finished" not in outcome["output"]


def test_cooperative_task_only_sees_the_flag_and_stops_itself(guard: list[int]) -> None:
    outcome, took = run_with_signals(spec("demo.cooperative", seconds=10), (0.2, signal.SIGINT))
    assert took < 2
    assert outcome["status"] == "interrupted"
    assert outcome["output"].startswith("[cooperative] stopping after step ")


def test_an_interrupt_owed_from_before_the_task_is_raised_as_it_starts() -> None:
    called = []
    signals = TaskSignals()
    signals.sigints, signals.interrupt_owed = 1, True
    with pytest.raises(KeyboardInterrupt):
        call_task(signals, lambda: called.append(1), {})
    assert called == []
    assert not signals.interrupt_owed


def test_hook_errors_are_reported_and_the_other_hooks_still_run(guard: list[int]) -> None:
    outcome, _ = run_with_signals(spec("unit.hooks", seconds=10), (0.1, signal.SIGINT))
    assert outcome["hooks_run"] == 2
    assert (
        "on_interrupt hook hooks.<locals>.broken raised ValueError: hook broke"
        in (outcome["output"])
    )
    assert outcome["output"].endswith("[hook] first registered, runs last\n")


def test_sigterm_during_hooks_stops_them_and_is_the_stage(guard: list[int]) -> None:
    outcome, took = run_with_signals(
        spec("unit.hooks", seconds=10, slow_hook=10),
        (0.1, signal.SIGINT),
        (0.4, signal.SIGTERM),
    )
    assert took < 2
    assert (outcome["status"], outcome["stage"], outcome["hooks_run"]) == (
        "interrupted",
        "SIGTERM",
        1,
    )
    assert "[tether] SIGTERM during on_interrupt hooks; 2 not run" in outcome["output"]


def test_interrupted_task_locals_are_freed_when_run_task_returns(guard: list[int]) -> None:
    _payloads.clear()
    outcome, _ = run_with_signals(spec("unit.hold_object", seconds=10), (0.1, signal.SIGINT))
    assert outcome["status"] == "interrupted"
    assert _payloads and _payloads[0]() is None


def test_a_failure_forgets_the_interpreter_s_last_traceback(guard: list[int]) -> None:
    try:
        raise RuntimeError("an earlier failure")
    except RuntimeError:
        sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()
    outcome = run_task(spec("demo.fail", message="x"))
    assert outcome["status"] == "failed"
    assert not hasattr(sys, "last_traceback")


def test_interrupted_task_memory_comes_back(guard: list[int]) -> None:
    outcome, _ = run_with_signals(spec("demo.hold", mb=200, seconds=10), (0.5, signal.SIGINT))
    resources = outcome["resources"]
    assert outcome["status"] == "interrupted"
    assert resources["rss_after_bytes"] - resources["rss_before_bytes"] < 64 << 20
    assert resources["reclaimed"] is True


def test_child_processes_are_killed_even_when_the_task_succeeds(guard: list[int]) -> None:
    outcome = run_task(spec("demo.spawn", seconds=0.05))
    assert outcome["status"] == "succeeded"
    assert outcome["resources"]["leftover_children"] == 1
    # Killed, so gone: the engine is clean and need not be recycled.
    assert outcome["resources"]["reclaimed"] is True
    assert not psutil.pid_exists(outcome["value"])


def test_children_that_existed_before_the_task_are_left_alone(guard: list[int]) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        outcome = run_task(spec("demo.echo", value=1))
        assert outcome["resources"]["leftover_children"] == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_non_json_results_fail_the_task(guard: list[int]) -> None:
    outcome = run_task(spec("unit.returns_set"))
    assert (outcome["status"], outcome["error_type"]) == ("failed", "ResultNotSerializable")
    assert "result: set is not JSON" in outcome["error_message"]


def test_unknown_tasks_and_bad_arguments_fail_without_raising(guard: list[int]) -> None:
    assert run_task(spec("demo.nope"))["error_type"] == "UnknownTask"
    bad = run_task({**spec("demo.sleep"), "args": ["not", "an", "object"]})
    # registry.ArgumentError, a TypeError naming the fields at fault
    assert (bad["status"], bad["error_type"]) == ("failed", "ArgumentError")


def test_system_exit_in_a_task_is_a_failure_not_an_exit(guard: list[int]) -> None:
    outcome = run_task(spec("unit.exits"))
    assert (outcome["status"], outcome["error_type"], outcome["error_message"]) == (
        "failed",
        "SystemExit",
        "3",
    )


def test_interrupt_storm_in_process_every_outcome_is_clean(guard: list[int]) -> None:
    stop = threading.Event()

    def shooter() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.0005)

    thread = threading.Thread(target=shooter, daemon=True)
    thread.start()
    statuses: collections.Counter[str] = collections.Counter()
    try:
        for i in range(600):
            name, args = (
                ("demo.echo", {"value": i}) if i % 2 else ("demo.sleep", {"seconds": 0.001})
            )
            outcome = run_task(spec(name, **args))
            statuses[outcome["status"]] += 1
            if outcome["status"] == "succeeded" and i % 2:
                assert outcome["value"] == i
    finally:
        stop.set()
        thread.join()
    time.sleep(0.05)  # the last SIGINTs land while idle: ignored
    assert set(statuses) <= {"succeeded", "interrupted"}
    assert statuses["interrupted"] > 0


def test_sigint_during_c_work_still_interrupts_the_blocking_call_after_it(
    guard: list[int],
) -> None:
    # demo.hold fills 768 MiB (one C operation, ~0.2-0.7 s, holding the GIL, so the signal
    # comes from another process) and then sleeps. CPython checks for signals only after
    # the sleep returns; without a kick the SIGINT would wait the full 10 s.
    kicks = GUARD.kicks_sent
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.1; kill -INT {os.getpid()}"])
    try:
        started = time.monotonic()
        outcome = run_task(spec("demo.hold", mb=768, seconds=10))
        took = time.monotonic() - started
    finally:
        killer.wait()
    assert outcome["status"] == "interrupted"
    assert took < 5, f"the SIGINT waited for the sleep ({took:.1f} s)"
    assert GUARD.kicks_sent > kicks


def test_a_task_that_replaces_the_sigint_handler_does_not_unguard_the_next(
    guard: list[int],
) -> None:
    assert run_task(spec("unit.replaces_sigint_handler"))["status"] == "succeeded"
    outcome, _ = run_with_signals(spec("demo.sleep", seconds=10), (0.1, signal.SIGINT))
    assert outcome["status"] == "interrupted"
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # idle again: ignored, not a KeyboardInterrupt here


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_plain_python_signal_handling(guard: list[int]) -> None:
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the guard let go of both signals
        plain = (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        )
        os._exit(0 if plain else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
