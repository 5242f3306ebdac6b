"""The ``tether`` command against a real server: what a user at a terminal sees.

Live views run under a pseudo-terminal (pexpect), everything else as a plain
subprocess; every process started here is ended by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.support import ServerProcess, free_port, serve_for_tests

TETHER = str(Path(sys.executable).parent / "tether")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WAIT = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve_for_tests(tmp_path_factory, "cli")


@pytest.fixture(scope="module")
def env(server: ServerProcess) -> dict[str, str]:
    """The environment of every command: the server comes from TETHER_ADDRESS."""
    return {**os.environ, "TETHER_ADDRESS": server.address, "TERM": "xterm", "COLUMNS": "120"}


def tether(
    env: dict[str, str], *args: str, timeout: float = WAIT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TETHER, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def tether_json(env: dict[str, str], *args: str) -> Any:
    done = tether(env, *args, "--output", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def in_terminal(env: dict[str, str], *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        TETHER, list(args), env=env, dimensions=(30, 120), encoding="utf-8", timeout=WAIT
    )


def finish(child: pexpect.spawn) -> tuple[str, int]:
    """Waits for a terminal session to end; returns its text without colours and its exit code."""
    child.expect(pexpect.EOF)
    child.close()
    return ANSI.sub("", child.before or ""), child.exitstatus


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --------------------------------------------------------------------------- submit --wait


def test_submit_wait_shows_live_progress_and_output_and_exits_0(env: dict[str, str]) -> None:
    child = in_terminal(
        env, "submit", "demo.count", "--arg", "n=20", "--arg", "interval=0.05", "--wait"
    )
    child.expect(r"submitted tasks/\w+ \(demo\.count\)")
    child.expect("step 1\r\n")  # output printed as it streams, above the bar
    child.expect(r"\d+%")  # the progress bar, while the task runs
    child.expect(r"step \d+/20")  # the task's progress message beside it
    text, code = finish(child)
    assert code == 0, text
    assert "step 20" in text
    assert "100%" in text
    assert re.search(r"SUCCEEDED tasks/\w+ in [\d.]+s", text)
    assert text.rstrip().endswith("20")


def test_an_interrupted_wait_exits_3_with_one_clear_error_line(env: dict[str, str]) -> None:
    child = in_terminal(env, "submit", "demo.sleep", "--arg", "seconds=60", "--wait")
    child.expect(r"submitted tasks/(\w+)")
    task_id = child.match.group(1)
    child.expect("RUNNING")
    stopped = tether(env, "interrupt", task_id, "--reason", "from the e2e test")
    assert stopped.returncode == 0, stopped.stderr
    assert re.match(r"(INTERRUPTING|INTERRUPTED) tasks/" + task_id, stopped.stdout)
    text, code = finish(child)
    assert code == 3, text
    line = one_error_line(text)
    assert line.startswith("error: INTERRUPTED: task tasks/" + task_id)
    assert "from the e2e test" in line


def test_a_failed_wait_exits_1(env: dict[str, str]) -> None:
    done = tether(env, "submit", "demo.fail", "--arg", "message=boom", "--wait")
    assert done.returncode == 1
    assert one_error_line(done.stderr).startswith("error: TASK_RAISED: task tasks/")
    assert "RuntimeError: boom" in done.stderr


def test_a_timed_out_wait_exits_4(env: dict[str, str]) -> None:
    done = tether(
        env, "submit", "demo.sleep", "--arg", "seconds=60", "--timeout", "500ms", "--wait"
    )
    assert done.returncode == 4, done.stderr
    assert "TIMED_OUT" in one_error_line(done.stderr)


# --------------------------------------------------------------------------- JSON


def test_json_output_of_every_command_parses(env: dict[str, str]) -> None:
    submitted = tether_json(env, "submit", "demo.echo", "--arg", 'value={"a": [1, 2]}')
    assert submitted["name"].startswith("tasks/") and submitted["task"] == "demo.echo"

    finished = tether_json(env, "submit", "demo.echo", "--arg", "value=7", "--wait")
    assert (finished["state"], finished["result"]) == ("SUCCEEDED", 7)

    got = tether_json(env, "get", finished["id"])
    assert got["name"] == finished["name"] and got["args"] == {"value": 7}

    listed = tether_json(env, "ls", "--task", "demo.echo")
    assert finished["name"] in [task["name"] for task in listed]

    cluster = tether_json(env, "cluster")
    assert len(cluster["engines"]) >= 2 and "demo.echo" in cluster["registered_tasks"]

    sleeper = tether_json(env, "submit", "demo.sleep", "--arg", "seconds=60")
    stopped = tether_json(env, "interrupt", sleeper["id"], "--grace", "1s")
    assert stopped["state"] in {"PENDING", "CANCELLED", "INTERRUPTING", "INTERRUPTED"}


def test_watch_json_prints_one_event_per_line(env: dict[str, str]) -> None:
    label = f"run={os.getpid()}-{free_port()}"
    tether_json(env, "submit", "demo.echo", "--arg", "value=1", "--label", label)
    watcher = subprocess.Popen(
        [TETHER, "watch", "--label", label, "--output", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        assert first["type"] == "SNAPSHOT" and first["task"]["labels"] == dict([label.split("=")])
        tether_json(env, "submit", "demo.echo", "--arg", "value=2", "--label", label)
        later = json.loads(watcher.stdout.readline())
        assert later["type"] == "STATE_CHANGED" and later["resume_token"]
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait(timeout=10)
    assert watcher.returncode == 130
    assert "Traceback" not in (watcher.stderr.read() if watcher.stderr else "")


# --------------------------------------------------------------------------- tables


def test_ls_get_and_cluster_show_tables(env: dict[str, str]) -> None:
    finished = tether_json(env, "submit", "demo.echo", "--arg", "value=hello", "--wait")

    listed = tether(env, "ls", "--state", "succeeded", "--task", "demo.echo")
    assert listed.returncode == 0
    assert re.search(finished["id"] + r"\s+demo\.echo\s+SUCCEEDED", listed.stdout)

    shown = tether(env, "get", finished["name"])
    assert shown.returncode == 0
    assert re.search(r"state\s+SUCCEEDED", shown.stdout)
    assert re.search(r'result\s+"hello"', shown.stdout)

    cluster = tether(env, "cluster")
    assert cluster.returncode == 0
    assert re.search(r"cluster \S+ \(embedded\), \d+ engines of 2", cluster.stdout)
    assert re.search(r"\n\s*0\s+(IDLE|BUSY|STARTING)", cluster.stdout)


def test_watch_shows_a_live_table_until_ctrl_c(env: dict[str, str]) -> None:
    child = in_terminal(env, "watch", "--task", "demo.count")
    child.expect("events")
    done = tether(env, "submit", "demo.count", "--arg", "n=3", "--arg", "interval=0.05")
    task_id = done.stdout.split()[1].removeprefix("tasks/")
    child.expect(task_id)
    child.expect("SUCCEEDED")
    child.sendintr()
    _, code = finish(child)
    assert code == 130


# --------------------------------------------------------------------------- errors


def test_a_missing_task_is_one_line_and_exit_5(env: dict[str, str]) -> None:
    done = tether(env, "get", "does-not-exist")
    assert done.returncode == 5
    line = one_error_line(done.stderr)
    assert line.startswith("error: TASK_NOT_FOUND: ") and "tasks/does-not-exist" in line


def test_invalid_arguments_and_usage_errors_are_one_line_and_exit_2(env: dict[str, str]) -> None:
    unknown = tether(env, "submit", "no.such.task")
    assert unknown.returncode == 2
    assert one_error_line(unknown.stderr).startswith("error: UNKNOWN_TASK: ")

    usage = tether(env, "submit", "demo.echo", "--timeout", "soon")
    assert usage.returncode == 2
    assert one_error_line(usage.stderr).startswith("error: argument --timeout: invalid duration")


def test_interrupting_a_finished_task_fails_with_one_line(env: dict[str, str]) -> None:
    finished = tether_json(env, "submit", "demo.echo", "--wait")
    done = tether(env, "interrupt", finished["id"])
    assert done.returncode == 1
    assert one_error_line(done.stderr).startswith("error: TASK_ALREADY_TERMINAL: ")


def test_an_unreachable_server_is_one_line_and_exit_6(env: dict[str, str]) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    done = tether({**env, "TETHER_ADDRESS": "127.0.0.1:1"}, "cluster", "--address", nowhere)
    assert done.returncode == 6
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: UNAVAILABLE: cannot reach the tether server at {nowhere}")
