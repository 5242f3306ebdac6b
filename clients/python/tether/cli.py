"""The ``tether`` command: submit, inspect, watch and stop tasks from a shell.

::

    tether submit demo.count --arg n=20 --arg interval=0.05 --wait
    tether ls --state running --label team=search
    tether get 1f0c...            (a bare id or "tasks/ID")
    tether interrupt 1f0c... --reason "wrong prompt" --grace 5s
    tether watch --task demo.sleep
    tether cluster

Every command takes ``--address`` (default ``$TETHER_ADDRESS``, else
127.0.0.1:50051) and ``--output json`` (one JSON document; JSON lines for
``watch``). Durations are written ``500ms``, ``5s``, ``2m``, ``1h`` or as plain
seconds. Errors are one line on stderr, ``error: REASON: message``.

Exit codes: 0 success; 1 the task failed (or another error); 2 usage or invalid
argument; 3 the task was interrupted or cancelled; 4 it timed out; 5 not found;
6 the server is unavailable; 130 stopped with Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from rich.console import Console
from rich.live import Live

from tether import _render
from tether._core import DEFAULT_ADDRESS
from tether._exceptions import (
    InvalidArgument,
    NotFound,
    TaskCancelled,
    TaskFailed,
    TaskInterrupted,
    TaskOutcomeError,
    TaskTimedOut,
    TetherError,
    Unavailable,
)
from tether._models import Task, TaskFilter, TaskRetryPolicy, TaskState
from tether._sync import Client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3
EXIT_TIMED_OUT = 4
EXIT_NOT_FOUND = 5
EXIT_UNAVAILABLE = 6
EXIT_CTRL_C = 130

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class UsageError(Exception):
    """A command line that cannot be run as written (exit code 2)."""


# --------------------------------------------------------------------------- values


def parse_duration(text: str) -> timedelta:
    """``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"`` or plain seconds (``"1.5"``)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (try 500ms, 5s, 2m, 1h)")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_pair(text: str) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; the value may contain ``=``."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_arg_value(text: str) -> Any:
    """An ``--arg`` value: JSON when it parses (``20``, ``true``, ``[1,2]``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_state(text: str) -> TaskState:
    """A state by name, any case, with or without the ``TASK_STATE_`` prefix."""
    name = text.strip().upper().removeprefix("TASK_STATE_")
    try:
        state = TaskState[name]
    except KeyError:
        state = TaskState.UNSPECIFIED
    if state is TaskState.UNSPECIFIED:
        choices = ", ".join(s.name.lower() for s in TaskState if s is not TaskState.UNSPECIFIED)
        raise argparse.ArgumentTypeError(f"unknown state {text!r} (choose from {choices})")
    return state


def exit_code_for(error: BaseException) -> int:
    """The documented exit code of an error (see the module docstring)."""
    if isinstance(error, TaskInterrupted | TaskCancelled):
        return EXIT_INTERRUPTED
    if isinstance(error, TaskTimedOut):
        return EXIT_TIMED_OUT
    if isinstance(error, TaskFailed):
        return EXIT_FAILED
    if isinstance(error, InvalidArgument | UsageError | ValueError):
        return EXIT_USAGE
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def error_line(error: BaseException, address: str) -> str:
    """The one line printed on stderr for an error."""
    if isinstance(error, Unavailable) and not error.reason:
        text = f"UNAVAILABLE: cannot reach the tether server at {address}: {error.message}"
    elif (
        isinstance(error, TaskInterrupted | TaskCancelled)
        and error.task.interrupt is not None
        and not (error.task.error and error.task.error.message)
    ):
        record = error.task.interrupt
        stage = record.final_stage if record.final_stage.value else record.stage
        text = f"{error} (interrupt by {record.requested_by or '?'}, stage {stage.name}"
        text += f", reason: {record.reason})" if record.reason else ")"
    elif isinstance(error, TetherError):
        text = str(error)
        if isinstance(error, InvalidArgument) and error.violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}" for v in error.violations)
            text += ")"
    else:
        text = str(error) or type(error).__name__
    return "error: " + " ".join(text.split())


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the one line of every other error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    # Accepted before and after the command; the command's copy only overrides when given.
    def default(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--address",
        default=default(""),
        help=f"server host:port (default: $TETHER_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default=default("text"),
        help="text (tables, live views) or json (one document; JSON lines for watch)",
    )


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state", action="append", type=parse_state, default=[], help="match this state"
    )
    parser.add_argument(
        "--label", action="append", type=parse_pair, default=[], metavar="K=V", help="match label"
    )
    parser.add_argument(
        "--task", action="append", default=[], metavar="NAME", help="match registered task"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tether", description="Submit, watch and stop tasks on a tether server.")
    _common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    submit = commands.add_parser("submit", help="submit a task (and --wait for it)")
    submit.add_argument("task", help="registered task, e.g. demo.sleep")
    submit.add_argument(
        "--arg",
        action="append",
        type=parse_pair,
        default=[],
        metavar="K=V",
        help="keyword argument; V is parsed as JSON when it can be (n=20, ok=true), else a string",
    )
    submit.add_argument("--label", action="append", type=parse_pair, default=[], metavar="K=V")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first")
    submit.add_argument("--timeout", type=parse_duration, help="run-time limit, e.g. 30s")
    submit.add_argument("--grace", type=parse_duration, help="time SIGINT gets before SIGTERM")
    submit.add_argument("--queue-timeout", type=parse_duration, help="longest wait in the queue")
    submit.add_argument("--tag", action="append", default=[], help="engine tag the task needs")
    submit.add_argument("--resume-from", metavar="ID", help="resume from this task's checkpoint")
    submit.add_argument("--request-id", help="idempotency key (default: a fresh UUID4)")
    submit.add_argument(
        "--retry",
        type=int,
        metavar="N",
        help="retry failed attempts, up to N attempts in all (3 when only --retry-on or --retry-backoff is given); each resumes from the last checkpoint",
    )
    submit.add_argument(
        "--retry-on",
        type=lambda text: tuple(r.strip().upper() for r in text.split(",") if r.strip()),
        default=(),
        metavar="REASON[,REASON...]",
        help="reasons retried: ENGINE_LOST, CLUSTER_LOST, RESOURCE_LIMIT, TASK_RAISED, TIMED_OUT"
        " (default ENGINE_LOST,CLUSTER_LOST)",
    )
    submit.add_argument(
        "--retry-backoff", type=parse_duration, help="wait before the first retry (doubles)"
    )
    submit.add_argument(
        "--preemptible",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="may a higher-priority task preempt it (it resumes later)? default: the server's",
    )
    submit.add_argument(
        "--wait", action="store_true", help="follow the task to its end; the exit code tells how"
    )

    get = commands.add_parser("get", help="show one task")
    get.add_argument("id", help="task id or tasks/ID")

    ls = commands.add_parser("ls", help="list tasks (oldest first)")
    _filter_options(ls)
    ls.add_argument("--limit", type=int, default=0, help="show at most this many (0: all)")

    interrupt = commands.add_parser("interrupt", help="stop a task")
    interrupt.add_argument("id", help="task id or tasks/ID")
    interrupt.add_argument("--reason", default="", help="recorded on the task")
    interrupt.add_argument("--grace", type=parse_duration, help="time SIGINT gets before SIGTERM")

    watch = commands.add_parser("watch", help="live table of tasks as they change")
    _filter_options(watch)
    watch.add_argument(
        "--no-initial", action="store_true", help="only changes, not the current tasks first"
    )
    watch.add_argument("--resume-token", help="continue after this token (from JSON output)")

    commands.add_parser("cluster", help="engines, their state and current task")

    for subparser in commands.choices.values():
        _common_options(subparser, defaults=False)
    return parser


# --------------------------------------------------------------------------- commands


def _print_json(value: Any) -> None:
    sys.stdout.write(_render.dumps(value) + "\n")
    sys.stdout.flush()


def _filter(args: argparse.Namespace) -> TaskFilter | None:
    if not (args.state or args.task or args.label):
        return None
    return TaskFilter(states=args.state, tasks=args.task, labels=dict(args.label))


def _retry(args: argparse.Namespace) -> TaskRetryPolicy | None:
    if args.retry is None and not args.retry_on and args.retry_backoff is None:
        return None
    return TaskRetryPolicy(
        max_attempts=3 if args.retry is None else args.retry,
        retry_on=args.retry_on,
        initial_backoff=args.retry_backoff,
    )


def _cmd_submit(client: Client, args: argparse.Namespace, console: Console) -> int:
    handle = client.submit(
        args.task,
        {key: parse_arg_value(value) for key, value in args.arg},
        labels=dict(args.label),
        priority=args.priority,
        timeout=args.timeout,
        grace=args.grace,
        queue_timeout=args.queue_timeout,
        required_tags=args.tag,
        resume_from=args.resume_from,
        request_id=args.request_id,
        retry=_retry(args),
        preemptible=args.preemptible,
    )
    if not args.wait:
        if args.output == "json":
            _print_json(handle.submitted)
        else:
            console.print(f"submitted {handle.name} ({args.task})", highlight=False)
        return EXIT_OK
    if args.output == "json":
        for _ in handle.watch(exclude_progress=True):
            pass
        task = handle.refresh()
        _print_json(task)
    else:
        console.print(f"submitted {handle.name} ({args.task})", highlight=False)
        try:
            with _render.TaskProgress(console) as progress:
                for event in handle.watch():
                    progress.show(event)
                progress.flush()
        except KeyboardInterrupt:
            sys.stderr.write(
                f"stopped waiting; {handle.name} goes on (stop it: tether interrupt {handle.id})\n"
            )
            return EXIT_CTRL_C
        task = handle.refresh()
        _print_outcome(task, console)
    if task.state is TaskState.SUCCEEDED:
        return EXIT_OK
    raise TaskOutcomeError.from_task(task)


def _print_outcome(task: Task, console: Console) -> None:
    elapsed = ""
    if task.start_time is not None and task.end_time is not None:
        elapsed = f" in {(task.end_time - task.start_time).total_seconds():.2f}s"
    line = _render.state_text(task.state)
    line.append(f" {task.name}{elapsed}", style="")
    console.print(line)
    if task.state is TaskState.SUCCEEDED:
        console.print(json.dumps(task.result, ensure_ascii=False), highlight=False, markup=False)


def _cmd_get(client: Client, args: argparse.Namespace, console: Console) -> int:
    task = client.get(args.id)
    if args.output == "json":
        _print_json(task)
    else:
        console.print(_render.task_details(task))
    return EXIT_OK


def _cmd_ls(client: Client, args: argparse.Namespace, console: Console) -> int:
    tasks = []
    for task in client.list(_filter(args)):
        tasks.append(task)
        if args.limit and len(tasks) >= args.limit:
            break
    if args.output == "json":
        _print_json(tasks)
    else:
        console.print(_render.task_table(tasks, width=console.width))
    return EXIT_OK


def _cmd_interrupt(client: Client, args: argparse.Namespace, console: Console) -> int:
    task = client.interrupt(args.id, reason=args.reason, grace=args.grace)
    if args.output == "json":
        _print_json(task)
    else:
        line = _render.state_text(task.state)
        line.append(f" {task.name}", style="")
        console.print(line)
    return EXIT_OK


def _cmd_watch(client: Client, args: argparse.Namespace, console: Console) -> int:
    events = client.watch(
        _filter(args),
        resume_token=args.resume_token,
        send_initial_state=not args.no_initial,
    )
    with events:
        if args.output == "json":
            for event in events:
                _print_json(event)
            return EXIT_OK
        table = _render.WatchTable(max_rows=console.height - 6)
        with Live(table.render(console.width), console=console, refresh_per_second=8) as live:
            for event in events:
                table.apply(event)
                live.update(table.render(console.width))
    return EXIT_OK


def _cmd_cluster(client: Client, args: argparse.Namespace, console: Console) -> int:
    cluster = client.cluster()
    if args.output == "json":
        _print_json(cluster)
    else:
        console.print(_render.cluster_view(cluster))
    return EXIT_OK


def _console() -> Console:
    # Piped text keeps whole table rows (rich would fold them to 80 columns).
    width = None if sys.stdout.isatty() else 200
    return Console(highlight=False, width=width)


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace, Console], int]] = {
    "submit": _cmd_submit,
    "get": _cmd_get,
    "ls": _cmd_ls,
    "interrupt": _cmd_interrupt,
    "watch": _cmd_watch,
    "cluster": _cmd_cluster,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``tether`` command; returns its exit code.

    On Ctrl-C the client is left open: :func:`run` ends the process at once (closing
    gRPC channels after an interrupted stream can block, see there).
    """
    address = DEFAULT_ADDRESS
    try:
        args = build_parser().parse_args(argv)
        client = Client(args.address or None)
        address = client.address
        try:
            code = _COMMANDS[args.command](client, args, _console())
        except BaseException:
            if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                client.close()
            raise
        client.close()
        return code
    except KeyboardInterrupt:
        return EXIT_CTRL_C
    except BrokenPipeError:
        # The reader went away (`tether watch -o json | head`): that is not an error.
        # Point stdout at devnull so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (TetherError, UsageError, ValueError) as error:
        sys.stderr.write(error_line(error, address) + "\n")
        return exit_code_for(error)


def run() -> None:
    """The ``tether`` console command: :func:`main`, then exit with its code.

    After Ctrl-C the process leaves without the interpreter's shutdown: closing a gRPC
    channel whose stream a KeyboardInterrupt cut, and joining gRPC's threads at exit,
    could block (a rare hang of ``tether watch`` under load, exit by SIGKILL instead of
    130). Nothing is left to save at that point; the output is flushed first.
    """
    code = main()
    if code == EXIT_CTRL_C:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
