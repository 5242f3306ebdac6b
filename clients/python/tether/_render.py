"""How the ``tether`` command shows things: rich tables and live views, and JSON.

Kept apart from ``cli`` (which parses arguments and calls the client) so that
each stays short; nothing here talks to a server.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from tether._models import Cluster, EngineState, Task, TaskEvent, TaskEventType, TaskState

STATE_STYLES: Mapping[TaskState, str] = {
    TaskState.PENDING: "yellow",
    TaskState.RUNNING: "cyan",
    TaskState.INTERRUPTING: "magenta",
    TaskState.SUCCEEDED: "green",
    TaskState.FAILED: "bold red",
    TaskState.INTERRUPTED: "yellow",
    TaskState.TIMED_OUT: "red",
    TaskState.CANCELLED: "dim yellow",
}

_ENGINE_STYLES: Mapping[EngineState, str] = {
    EngineState.IDLE: "green",
    EngineState.BUSY: "cyan",
    EngineState.STARTING: "yellow",
    EngineState.STOPPING: "magenta",
    EngineState.LOST: "red",
}


# --------------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """Plain JSON data for a model: enums by name, times in ISO 8601, durations in seconds.

    ``raw`` protobufs are left out; tasks gain their ``id``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {
            item.name: jsonable(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if item.name != "raw"
        }
        if isinstance(value, Task):
            data = {"id": value.id, **data}
        return data
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


def dumps(value: Any) -> str:
    """One line of JSON for ``--output json``."""
    return json.dumps(jsonable(value), ensure_ascii=False, sort_keys=False)


# --------------------------------------------------------------------------- cells


def state_text(state: TaskState) -> Text:
    return Text(state.name, style=STATE_STYLES.get(state, ""))


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    return _seconds_text(max((now - moment).total_seconds(), 0.0))


def _seconds_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _runtime(task: Task, now: datetime) -> str:
    if task.start_time is None:
        return "-"
    return _seconds_text(((task.end_time or now) - task.start_time).total_seconds())


def _progress_text(task: Task) -> str:
    if task.progress is None:
        return ""
    percent = f"{task.progress.fraction * 100:.0f}%"
    return f"{percent} {task.progress.message}".strip()


def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _engine_text(engine_id: int | None) -> str:
    return "-" if engine_id is None else str(engine_id)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[Task], str | Text]
    keep: int
    """Lower goes first when the table is too wide; 0 never goes."""
    right: bool = False


def task_table(tasks: Iterable[Task], *, width: int, title: str | None = None) -> Table:
    """The table of ``tether ls`` and ``tether watch``, at most ``width`` columns wide.

    Ids, task names and states are never cut. Columns empty in every row are left
    out, and when the rest does not fit, the least useful go first (labels,
    priority, progress, run time, age, engine).
    """
    now = datetime.now(UTC)
    rows = list(tasks)
    columns = [
        _Column("ID", lambda t: t.id, 0),
        _Column("TASK", lambda t: t.task, 0),
        _Column("STATE", lambda t: state_text(t.state), 0),
        _Column("ENG", lambda t: _engine_text(t.engine_id), 6, right=True),
        _Column("PRI", lambda t: str(t.priority), 2, right=True),
        _Column("AGE", lambda t: _age(t.create_time, now), 5, right=True),
        _Column("RUN", lambda t: _runtime(t, now), 4, right=True),
        _Column("PROGRESS", _progress_text, 3),
        _Column("LABELS", lambda t: _labels_text(t.labels), 1),
    ]
    cells = {column.header: [column.cell(task) for task in rows] for column in columns}
    sizes = {
        header: max([len(header)] + [len(str(cell)) for cell in values])
        for header, values in cells.items()
    }
    shown = [c for c in columns if c.keep == 0 or any(str(v) for v in cells[c.header])]
    shown = [c for c in shown if c.header != "PRI" or any(t.priority for t in rows)]
    while sum(sizes[c.header] + 3 for c in shown) > width and any(c.keep for c in shown):
        shown.remove(min((c for c in shown if c.keep), key=lambda c: c.keep))
    table = Table(title=title, box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for column in shown:
        table.add_column(column.header, no_wrap=True, justify="right" if column.right else "left")
    for index in range(len(rows)):
        table.add_row(*(cells[column.header][index] for column in shown))
    return table


def task_details(task: Task) -> RenderableType:
    """Everything about one task, for ``tether get``."""
    now = datetime.now(UTC)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, RenderableType]] = [
        ("name", task.name),
        ("task", task.task),
        ("state", state_text(task.state)),
        ("args", Text(json.dumps(jsonable(task.args)))),
        ("labels", _labels_text(task.labels) or "-"),
        ("priority", str(task.priority)),
        ("engine", _engine_text(task.engine_id)),
        ("attempt", str(task.attempt)),
        ("created", _when(task.create_time, now)),
        ("started", _when(task.start_time, now)),
        ("ended", _when(task.end_time, now)),
        ("runtime", _runtime(task, now)),
        ("timeout", _duration(task.timeout)),
    ]
    if task.progress is not None:
        rows.append(("progress", _progress_text(task)))
    if task.interrupt is not None:
        record = task.interrupt
        stage = record.final_stage if record.final_stage.value else record.stage
        text = f"{record.cause.name.lower()} by {record.requested_by or '?'}, stage {stage.name}"
        if record.reason:
            text += f": {record.reason}"
        rows.append(("interrupt", Text(text)))
    if task.error is not None:
        error = task.error
        detail = ": ".join(part for part in (error.type, error.message) if part)
        rows.append(("error", Text(f"{error.reason} {detail}".strip(), style="red")))
    if task.state is TaskState.SUCCEEDED:
        rows.append(("result", Text(json.dumps(task.result))))
    if task.resources is not None and task.resources.summary:
        rows.append(("resources", Text(task.resources.summary)))
    if task.retry is not None:
        r = task.retry
        rows.append(("retry", f"up to {r.max_attempts} attempts on {', '.join(r.retry_on)}"))
    if task.preemptible:
        rows.append(("preemptible", "yes"))
    if task.owner:
        rows.append(("owner", task.owner))
    rows.append(("revision", str(task.revision)))
    for label, value in rows:
        grid.add_row(label, value)
    parts: list[RenderableType] = [grid]
    if len(task.attempts) > 1 or any(a.reason for a in task.attempts):
        parts += [Text("\nattempts:", style="bold"), attempts_table(task, now)]
    if task.output:
        suffix = " (truncated)" if task.output_truncated else ""
        parts += [Text(f"\noutput{suffix}:", style="bold"), Text(task.output)]
    if task.error is not None and task.error.traceback:
        parts += [Text("\ntraceback:", style="bold"), Text(task.error.traceback, style="dim")]
    return Group(*parts)


def attempts_table(task: Task, now: datetime) -> Table:
    """One row per attempt: engine, start, run time, how it ended and why."""
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for column in ("#", "engine", "started", "ran", "ending", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    for a in task.attempts:
        ran = "-"
        if a.start_time is not None:
            ran = _seconds_text(((a.end_time or now) - a.start_time).total_seconds())
        ending = "running" if a.end_time is None else a.ending.name.lower()
        reason = a.reason + (f" by {a.ended_by}" if a.ended_by else "")
        if a.message:
            reason += f": {a.message}"
        table.add_row(
            str(a.attempt),
            _engine_text(a.engine_id),
            _when(a.start_time, now),
            ran,
            ending,
            Text(reason),
        )
    return table


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    return f"{moment.astimezone().isoformat(timespec='seconds')} ({_age(moment, now)} ago)"


def _duration(value: timedelta | None) -> str:
    return "-" if value is None else _seconds_text(value.total_seconds())


def cluster_view(cluster: Cluster) -> RenderableType:
    """Engines and their current tasks, for ``tether cluster``."""
    now = datetime.now(UTC)
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for column in ("ENGINE", "STATE", "TASK", "QUEUED", "HOST", "PID", "DONE", "TAGS", "LAST SEEN"):
        table.add_column(column, no_wrap=True)
    for engine in cluster.engines:
        table.add_row(
            str(engine.id),
            Text(engine.state.name, style=_ENGINE_STYLES.get(engine.state, "")),
            engine.current_task.removeprefix("tasks/") or "-",
            str(engine.queued_tasks),
            engine.host,
            str(engine.pid),
            str(engine.tasks_done),
            ",".join(engine.tags) or "-",
            _age(engine.last_seen, now) + " ago" if engine.last_seen else "-",
        )
    if not cluster.serving:
        health = Text(f"not serving: {cluster.problem}", style="bold red")
    elif cluster.degraded:
        health = Text("degraded", style="bold red")
    else:
        health = Text("ok", style="green")
    summary = Text.assemble(
        f"cluster {cluster.cluster_id or '?'} ({cluster.mode.name.lower()}), ",
        f"{len(cluster.engines)} engines of {cluster.target_size}, ",
        health,
        f"; {cluster.running_tasks} running, {cluster.pending_tasks} pending",
        f"; cluster restarted {cluster.cluster_restarts} times" if cluster.cluster_restarts else "",
    )
    footer = [Text("tasks: " + (", ".join(cluster.registered_tasks) or "-"), style="dim")]
    if cluster.models:
        footer.append(Text("models: " + ", ".join(m.name for m in cluster.models), style="dim"))
    return Group(summary, table, *footer)


# --------------------------------------------------------------------------- live views


class WatchTable:
    """The state of ``tether watch``: the latest version of each task seen, in order of arrival."""

    def __init__(self, max_rows: int) -> None:
        self._tasks: dict[str, Task] = {}
        self._max_rows = max(max_rows, 1)
        self.events = 0

    def apply(self, event: TaskEvent) -> None:
        # Rows keep the place where their task first appeared: a changing row does not jump.
        self.events += 1
        self._tasks[event.task.name] = event.task

    def render(self, width: int) -> Table:
        rows = list(self._tasks.values())[-self._max_rows :]
        hidden = len(self._tasks) - len(rows)
        title = f"{len(self._tasks)} tasks, {self.events} events"
        if hidden:
            title += f" ({hidden} older not shown)"
        return task_table(rows, width=width, title=title)


class TaskProgress(Progress):
    """A progress bar for one task, with the output line being written shown above it.

    Complete lines of output are printed above the live display as they arrive;
    the current, unfinished line is part of the display until its newline comes.
    """

    def __init__(self, console: Console) -> None:
        self._partial = ""  # read by get_renderables, which the base __init__ already calls
        self._written = 0  # characters of the task's output shown so far
        self._attempt = 0  # the attempt whose output is arriving
        self._attempt_chars = 0  # characters of that attempt's output seen
        super().__init__(
            SpinnerColumn(),
            TextColumn("{task.fields[state]}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self._bar = self.add_task("", total=None, state="PENDING")

    def get_renderables(self) -> Iterable[RenderableType]:
        if self._partial:
            yield Text(self._partial)
        yield self.make_tasks_table(self.tasks)

    def show(self, event: TaskEvent) -> None:
        task = event.task
        if task.attempt != self._attempt:
            # A retried or preempted task starts its output over: a resumed attempt
            # replays its checkpoint's text first, which is shown already.
            self._attempt, self._attempt_chars = task.attempt, 0
        if event.type is TaskEventType.OUTPUT:
            self._write(event.output_chunk)
        elif task.output and not task.output_truncated and len(task.output) > self._attempt_chars:
            # Snapshots and state changes carry the whole output so far. Print what the
            # OUTPUT events have not: everything, on a snapshot; on the final state, a
            # last chunk the task emitted as it ended, which may come without its event.
            self._write(task.output[self._attempt_chars :])
        state = Text(task.state.name, style=STATE_STYLES.get(task.state, "")).markup
        fields: dict[str, Any] = {"state": state}
        if task.progress is not None:
            fields.update(
                total=1.0, completed=task.progress.fraction, description=task.progress.message
            )
        if task.state.is_terminal:
            done = task.state is TaskState.SUCCEEDED
            fraction = task.progress.fraction if task.progress is not None else 0.0
            fields.update(total=1.0, completed=1.0 if done else fraction)
        self.update(self._bar, **fields)

    def _write(self, chunk: str) -> None:
        start = self._attempt_chars
        self._attempt_chars += len(chunk)
        chunk = chunk[max(0, self._written - start) :]
        if not chunk:
            return
        self._written += len(chunk)
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.console.out(line, highlight=False)
        self.refresh()

    def flush(self) -> None:
        """Prints the unfinished line above the display, if any (before ``stop``)."""
        if self._partial:
            self.console.out(self._partial, highlight=False)
            self._partial = ""
            self.refresh()
