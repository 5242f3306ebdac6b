"""The grpcurl recipes of docs/api.md, as data: scripts/gen_api_doc.py writes the
doc from them (with real outputs) and tests/e2e/test_grpcurl_docs.py runs the
commands found in the doc against a live server.

Placeholders in commands, filled with real tasks before each run:
``tasks/SLEEPING`` a running demo.sleep; ``tasks/FINISHED`` a succeeded demo.count;
``tasks/COUNTING`` a fresh demo.count that runs for about a second; ``tasks/GENERATED``
a succeeded llm.generate on the built-in tiny model; ``TOKEN`` a
resume token from ListTasks.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

DOC_ADDRESS = "127.0.0.1:50051"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@dataclass(frozen=True)
class Recipe:
    command: str
    text: str = ""
    section: str = ""
    exit_code: int = 0


RECIPES = [
    Recipe(
        "grpcurl -plaintext 127.0.0.1:50051 list",
        "Services the server offers (reflection):",
        section="Discover",
    ),
    Recipe(
        "grpcurl -plaintext 127.0.0.1:50051 describe tether.v1.TaskService",
        "Every RPC and its comment:",
    ),
    Recipe(
        "grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check",
        "Health: SERVING once the cluster has at least one engine; NOT_SERVING while shutting down.",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"task": "demo.sleep", "args": {"seconds": 30}, '
        '"labels": {"team": "docs"}, "priority": 5, "timeout": "60s"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/SubmitTask",
        "Submit a registered task with JSON arguments. The answer comes at once, PENDING "
        "(or already RUNNING). `timeout` ends it TIMED_OUT through the escalation ladder.",
        section="SubmitTask",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"task": "demo.echo", "args": {"value": "hi"}, '
        '"request_id": "8c0e7a56-0a3c-4a51-9d0c-6b1f9d2a7e11"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/SubmitTask",
        "With a `request_id`, a retry returns the first answer (`deduplicated: true`); the same id "
        "with another payload is ALREADY_EXISTS / REQUEST_ID_REUSED.",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"task": "demo.sleep", "args": {"seconds": 5}, '
        '"retry": {"max_attempts": 3, "retry_on": ["ENGINE_LOST", "TASK_RAISED"], '
        '"initial_backoff": "1s"}, "preemptible": true}\' '
        "127.0.0.1:50051 tether.v1.TaskService/SubmitTask",
        "A retry policy: a failed attempt whose reason the policy names runs again (the same task, "
        "`attempt` + 1, back to PENDING after the backoff, resuming from the task's last "
        "checkpoint); every attempt is listed in `attempts`. `preemptible`: a higher-priority task "
        "that finds no free engine may take this one's engine (the task checkpoints, is queued "
        "again, and resumes). A bad policy is INVALID_ARGUMENT / INVALID_RETRY_POLICY.",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/COUNTING"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/StreamTaskStatus",
        "Watch one task: its current state first (SNAPSHOT), then every change (progress, output "
        "chunks, state), ending with OK after the terminal event.",
        section="StreamTaskStatus",
    ),
    Recipe(
        'grpcurl -plaintext -max-time 2 -d \'{"filter": {"labels": {"team": "docs"}}, '
        '"send_initial_state": true, "exclude_progress": true, "checkpoint_interval": "0.5s"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/StreamTaskStatus",
        "Watch every task matching a filter: the current matching tasks first, a checkpoint with "
        "`initial_state_complete`, then live changes; idle streams get checkpoints whose "
        "`resume_token` advances. A filter stream never ends by itself (here `-max-time` ends it, "
        "so grpcurl exits 68, DEADLINE_EXCEEDED).",
        exit_code=68,
    ),
    Recipe(
        'grpcurl -plaintext -max-time 3 -d \'{"filter": {"names": ["tasks/FINISHED", '
        '"tasks/COUNTING"]}, "send_initial_state": true, "exclude_progress": true}\' '
        "127.0.0.1:50051 tether.v1.TaskService/StreamTaskStatus",
        "Watch a set of tasks by name (at most 1,000): a task's name never changes, so the "
        "stream carries every event of those tasks, the terminal ones included, as one "
        "single-task stream per task would, but it never ends by itself. The Python client's "
        "handle watches share one such stream per client.",
        exit_code=68,
    ),
    Recipe(
        'grpcurl -plaintext -max-time 2 -d \'{"resume_token": "TOKEN", "exclude_progress": true}\' '
        "127.0.0.1:50051 tether.v1.TaskService/StreamTaskStatus",
        "Resume strictly after a token (from any stream message or from ListTasks): no gap, no "
        "duplicate, across server restarts. A token older than the retained log, or from another "
        "server, is OUT_OF_RANGE / RESUME_TOKEN_EXPIRED: re-list and watch again.",
        exit_code=68,
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/FINISHED"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/GetTask",
        "One task, FULL view by default (result, output, traceback included):",
        section="GetTask",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"page_size": 2, "filter": {"states": ["TASK_STATE_SUCCEEDED"], '
        '"tasks": ["demo.count"]}}\' 127.0.0.1:50051 tether.v1.TaskService/ListTasks',
        "Tasks in submission order, page by page (`next_page_token` is empty on the last page). "
        "`resume_token` lets you watch for changes after this listing.",
        section="ListTasks",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/SLEEPING", "reason": "runaway", '
        '"grace": {"sigint": "1s", "sigterm": "2s"}}\' '
        "127.0.0.1:50051 tether.v1.TaskService/InterruptTask",
        "Stop a running task: SIGINT at once (the task's cleanup hooks run), SIGTERM after "
        "`grace.sigint`, SIGKILL and a replacement engine after `grace.sigterm`. The answer is "
        "INTERRUPTING; the terminal state, with the stage that ended it, follows on the stream.",
        section="InterruptTask",
    ),
    Recipe(
        "grpcurl -plaintext 127.0.0.1:50051 tether.v1.ClusterService/GetCluster",
        "Engines (state, pid, current task, tasks done), the queue, limits and registered tasks:",
        section="GetCluster",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/GENERATED"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/GetTask",
        'A finished `llm.generate` (`{"prompt": "Once upon a time", "max_tokens": 24}` on '
        "the built-in `tiny` model): the streamed text is the task's `output`, the result "
        "holds the text, token counts, finish reason and timings. Arguments and result are "
        "described under [llm.generate](#llmgenerate) below.",
        section="Generate text",
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"task": "llm.generate", "args": {"prompt": "Hello", '
        '"max_tokens": 100000}}\' 127.0.0.1:50051 tether.v1.TaskService/SubmitTask',
        "A request that cannot fit the model is refused at submit time, never on an engine:",
        exit_code=67,
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/does-not-exist"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/GetTask",
        "Errors come with `ErrorInfo` (and `BadRequest` for wrong fields):",
        section="Errors",
        exit_code=69,
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"task": "no.such.task"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/SubmitTask",
        "",
        exit_code=67,
    ),
    Recipe(
        'grpcurl -plaintext -d \'{"name": "tasks/FINISHED"}\' '
        "127.0.0.1:50051 tether.v1.TaskService/InterruptTask",
        "",
        exit_code=73,
    ),
]


def _submit(stub: task_service_pb2_grpc.TaskServiceStub, task: str, args: dict[str, object]) -> str:
    s = struct_pb2.Struct()
    s.update(args)
    return stub.SubmitTask(spb.SubmitTaskRequest(task=task, args=s), timeout=10).task.name


def _wait(stub: task_service_pb2_grpc.TaskServiceStub, name: str, state: int) -> None:
    deadline = time.monotonic() + 30
    while stub.GetTask(spb.GetTaskRequest(name=name), timeout=10).task.state != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} never reached {tpb.TaskState.Name(state)}")
        time.sleep(0.05)


def fill(recipe: Recipe | str, address: str) -> str:
    """The recipe's command with its placeholders replaced by real tasks on ``address``."""
    cmd = recipe.command if isinstance(recipe, Recipe) else recipe
    with grpc.insecure_channel(address) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        if "tasks/SLEEPING" in cmd:
            name = _submit(stub, "demo.sleep", {"seconds": 30})
            _wait(stub, name, tpb.TASK_STATE_RUNNING)
            time.sleep(0.2)
            cmd = cmd.replace("tasks/SLEEPING", name)
        if "tasks/FINISHED" in cmd:
            name = _submit(stub, "demo.count", {"n": 2, "interval": 0.01})
            _wait(stub, name, tpb.TASK_STATE_SUCCEEDED)
            cmd = cmd.replace("tasks/FINISHED", name)
        if "tasks/GENERATED" in cmd:
            args = {"prompt": "Once upon a time", "max_tokens": 24}
            name = _submit(stub, "llm.generate", args)
            _wait(stub, name, tpb.TASK_STATE_SUCCEEDED)
            cmd = cmd.replace("tasks/GENERATED", name)
        if "tasks/COUNTING" in cmd:
            name = _submit(stub, "demo.count", {"n": 3, "interval": 0.3})
            cmd = cmd.replace("tasks/COUNTING", name)
        if "TOKEN" in cmd:
            token = stub.ListTasks(spb.ListTasksRequest(page_size=1), timeout=10).resume_token
            _submit(stub, "demo.echo", {"value": "after the token"})
            cmd = cmd.replace("TOKEN", token)
    return cmd.replace(DOC_ADDRESS, address)


def run(cmd: str, address: str) -> tuple[int, str]:
    """Run one grpcurl command line; returns (exit code, stdout + stderr)."""
    argv = shlex.split(cmd)
    assert argv[0] == "grpcurl", cmd
    argv[0] = GRPCURL
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr)


def documented_commands(doc: str) -> list[tuple[str, int]]:
    """(command, expected exit code) for every grpcurl command in a markdown text."""
    found = []
    for line in doc.splitlines():
        line = line.strip()
        if not line.startswith("grpcurl "):
            continue
        expected = 0
        if "   # exits " in line:
            line, _, code = line.partition("   # exits ")
            expected = int(code.split()[0])
        found.append((line.strip(), expected))
    return found
