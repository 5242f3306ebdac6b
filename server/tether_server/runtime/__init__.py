"""The tether runtime: the code that runs *inside* ipyparallel engines.

Task authors use :func:`task` and :class:`TaskContext`; the controller uses
:func:`setup_engine` and :func:`run_task` (applied on engines) and :func:`validate_args`
(to refuse bad requests before they reach an engine).

This package may import only the standard library, psutil and ``ipyparallel.datapub``
(DESIGN.md section 2): engines import it, and it must stay light and free of the
controller's dependencies.

Modules: :mod:`.registry` (task names and argument binding), :mod:`.context` (the task's
handle: progress, output, checkpoints, interrupt hooks), :mod:`.guard` (SIGINT/SIGTERM
that reach only the task they were meant for), :mod:`.resources` (measuring and taking
back memory, GPU memory and child processes), :mod:`.engine` (``setup_engine`` and
``run_task``), :mod:`.jsonvalue` (JSON checks for results and checkpoints).
"""

from .context import TaskContext
from .engine import run_task, setup_engine
from .guard import TaskTerminated
from .registry import (
    RegisteredTask,
    UnknownTaskError,
    get,
    load_modules,
    names,
    task,
    validate_args,
)

__all__ = [
    "RegisteredTask",
    "TaskContext",
    "TaskTerminated",
    "UnknownTaskError",
    "get",
    "load_modules",
    "names",
    "run_task",
    "setup_engine",
    "task",
    "validate_args",
]
