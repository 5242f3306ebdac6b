"""The two functions the controller runs on engines: ``setup_engine`` and ``run_task``.

The controller calls :func:`setup_engine` once per engine (``DirectView.apply``) right
after it registers, then :func:`run_task` for every task, one at a time per engine.
Both are pickled by reference, so engines import this module: it imports only the
stdlib, psutil and (lazily) ``ipyparallel.datapub``. It reaches the running kernel
through ``sys.modules`` instead of importing ipykernel or IPython.

The kernel's per-request SIGINT swap
------------------------------------
ipykernel wraps every shell request in ``Kernel.pre_handler_hook`` /
``post_handler_hook`` (ipykernel 7.4 ``kernelbase.py``: ``dispatch_shell`` calls them
around the handler; they install ``signal.default_int_handler`` and restore the previous
handler afterwards). That swap is what lets a stray SIGINT raise ``KeyboardInterrupt`` in
kernel code, losing replies or ending the engine. :func:`setup_engine` shadows both hooks
on the kernel *instance* with no-ops, so tether's guard (:mod:`.guard`) stays the SIGINT
handler for good. The hooks do nothing else, and ``dispatch_shell`` looks them up on every
request, so the patch takes effect from the very request that installs it (its
``post_handler_hook`` is already the no-op).

The outcome
-----------
:func:`run_task` never raises. It returns a plain dict, see :func:`run_task`.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import kernel_tuning, registry
from .attempts import BOOK, install_control_handlers
from .context import DEFAULT_MAX_OUTPUT_CHARS, TaskContext
from .guard import (
    GUARD,
    RUNTIME_CODES,
    SignalGuard,
    TaskSignals,
    TaskTerminated,
    call_hooks,
    call_task,
)
from .jsonvalue import JSONValue, to_json_value
from .monitor import start_engine_services
from .placement import placement
from .resources import (
    ChildCleanup,
    ResourceReport,
    Snapshot,
    drop_exception,
    format_exception,
    ipython_shell,
    kill_new_children,
    release_cuda_cache,
    release_memory,
    take_snapshot,
)

__all__ = [
    "DEFAULT_GPU_TOLERANCE_BYTES",
    "DEFAULT_RSS_TOLERANCE_BYTES",
    "DEMO_MODULE",
    "run_task",
    "setup_engine",
]

DEMO_MODULE: Final = "tether_server.tasks.demo"
"""Always loaded on engines, whatever the configuration lists."""

DEFAULT_RSS_TOLERANCE_BYTES: Final = 256 * 1024 * 1024
DEFAULT_GPU_TOLERANCE_BYTES: Final = 64 * 1024 * 1024

SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
INTERRUPTED: Final = "interrupted"
NOT_STARTED: Final = "not_started"

Sink = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- setup
def setup_engine(config: dict[str, Any]) -> dict[str, Any]:
    """Prepare this engine for tether; run once per engine, in its main thread.

    Installs the guarded SIGINT/SIGTERM handlers, stops the kernel from swapping SIGINT
    handlers around each request, applies ``config["task_settings"]`` (see
    ``registry.configure``) and imports ``config["task_modules"]`` (plus the demo
    tasks). Returns ``{"pid", "host", "tags", "tasks", "python"}``; ``tags`` is
    ``config["tags"]`` plus ``"gpu"`` where ``nvidia-smi`` exists and
    ``CUDA_VISIBLE_DEVICES`` is not empty. Safe to call again.
    """
    _install_guard()
    kernel_tuning.tune(
        getattr(ipython_shell(), "kernel", None),
        signatures=int(config.get("digest_history") or 0),
        log_level=config.get("log_level"),
    )
    modules = [str(m) for m in config.get("task_modules") or []]
    if DEMO_MODULE not in modules:
        modules.append(DEMO_MODULE)
    # Operator settings (e.g. the models behind llm.generate) before the preloads use them.
    registry.configure(config.get("task_settings") or {})
    registry.load_modules(modules)
    # Import heavy libraries now, not inside the first task: their memory would
    # otherwise count against that task (and an interrupt there would recycle the engine).
    # An entry "module:function" also calls that function (e.g. to create a CUDA context).
    for entry in config.get("preload_modules") or []:
        module_name, _, function = str(entry).partition(":")
        try:
            module = importlib.import_module(module_name)
            if function:
                getattr(module, function)()
        except Exception as exc:  # a failed warm-up must not keep the engine from serving
            print(f"tether: preload {entry} failed: {exc!r}", file=sys.stderr, flush=True)
    where = placement()  # host, slot and tags of a remote engine's slot (cluster/hosts.py)
    tags: list[str] = []
    for tag in [
        *(str(t) for t in config.get("tags") or []),
        *where["host_tags"],
        *_detected_tags(),
    ]:
        if tag not in tags:
            tags.append(tag)
    start_engine_services(config)  # the watchdog beside the engine, the load reports
    return {
        "pid": os.getpid(),
        "host": where["host"],
        "slot": where["slot"],
        "process_namespace": where["process_namespace"],
        "tags": tags,
        "tasks": registry.names(),
        "python": platform.python_version(),
    }


def detected_tags() -> list[str]:
    """``["gpu"]`` where this process would see a GPU (nvidia-smi, CUDA not hidden)."""
    return _detected_tags()


def _detected_tags() -> list[str]:
    # No torch import here: it takes seconds. nvidia-smi on PATH is a good enough sign.
    if shutil.which("nvidia-smi") and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        return ["gpu"]
    return []


def _install_guard() -> None:
    GUARD.install()
    if _neutralise_kernel_sigint_swap():
        install_control_handlers(ipython_shell().kernel)


def _keep_signal_handlers() -> None:
    """Replaces ``Kernel.pre_handler_hook``/``post_handler_hook``: leave SIGINT to tether."""


def _neutralise_kernel_sigint_swap() -> bool:
    """Shadow the kernel's per-request SIGINT hooks with no-ops; False outside a kernel."""
    kernel = getattr(ipython_shell(), "kernel", None)
    if kernel is None:
        return False
    kernel.pre_handler_hook = _keep_signal_handlers
    kernel.post_handler_hook = _keep_signal_handlers
    # What the original post hook would restore, should anything still call it.
    kernel.saved_sigint_handler = signal.getsignal(signal.SIGINT)
    return True


def _engine_publisher() -> Sink | None:
    """``publish_data`` when running in an engine kernel; None elsewhere (reports dropped)."""
    if getattr(ipython_shell(), "data_pub", None) is None:
        return None
    from ipyparallel.datapub import publish_data

    return publish_data  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- run_task
def run_task(spec: dict[str, Any], *, sink: Sink | None = None) -> dict[str, Any]:
    """Run one attempt of a registered task under the signal guard; return its outcome.

    ``spec``: ``task_id``, ``attempt``, ``task`` (registered name), ``args`` (JSON object),
    ``resume_state``, ``max_output_chars``, ``rss_tolerance_bytes``, ``gpu_tolerance_bytes``,
    ``drain_if_not_reclaimed`` (start nothing more after a task that left memory behind:
    the controller recycles the engine, see ``runtime.attempts``).
    ``sink`` replaces ``publish_data`` (tests, or running outside an engine).

    The outcome: ``status`` (succeeded / failed / interrupted), ``value`` (JSON),
    ``error_type``, ``error_message``, ``traceback``, ``stage`` (SIGINT / SIGTERM / ""),
    ``output`` and ``output_truncated`` (the bounded tail of ``ctx.emit``),
    ``resources`` (see :class:`~.resources.ResourceReport`), ``hooks_run``, ``published``
    (the reports sent on IOPub) and ``seconds`` (how long the task function ran, hooks
    included).

    Never raises: a task's exception, ``KeyboardInterrupt``, ``TaskTerminated`` and even
    ``SystemExit`` become the outcome. Signals are armed for this attempt from the first
    line to the last, so an interrupt meant for it is either raised inside the task or,
    when it came too early or too late to do so, owed (raised when the task starts) or
    dropped (the task had already ended: the truth wins).
    """
    signals = TaskSignals()
    key = (str(spec.get("task_id", "")), int(spec.get("attempt", 0)))
    refused = BOOK.begin(key, signals, _guard_for_this_thread())
    if refused:  # withdrawn while queued, or the engine is about to be recycled
        return {"status": NOT_STARTED, "error_message": refused, "published": 0}
    try:
        return _Attempt(spec, signals, sink).run()
    except BaseException as exc:  # a runtime bug; the engine must still answer
        return _internal_error_outcome(exc)
    finally:
        BOOK.end(key)


def _guard_for_this_thread() -> SignalGuard | None:
    """The guard, installed if need be; None off the main thread (no signals there)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if GUARD.installed:
        GUARD.install()  # cheap: puts our handlers back if an earlier task replaced them
    else:
        _install_guard()
    return GUARD


class _Attempt:
    """One run of one task: the steps of :func:`run_task`, in order."""

    def __init__(self, spec: dict[str, Any], signals: TaskSignals, sink: Sink | None) -> None:
        self.task_id = str(spec.get("task_id", ""))
        self.attempt = int(spec.get("attempt", 0))
        self.name = str(spec.get("task", ""))
        self.args: Any = spec.get("args") or {}
        self.rss_tolerance = int(spec.get("rss_tolerance_bytes", DEFAULT_RSS_TOLERANCE_BYTES))
        self.gpu_tolerance = int(spec.get("gpu_tolerance_bytes", DEFAULT_GPU_TOLERANCE_BYTES))
        self.drain_if_held = bool(spec.get("drain_if_not_reclaimed", False))
        self.signals = signals
        self.ctx = TaskContext(
            self.task_id,
            self.attempt,
            spec.get("resume_state"),
            sink=sink if sink is not None else _engine_publisher(),
            max_output_chars=int(spec.get("max_output_chars", DEFAULT_MAX_OUTPUT_CHARS)),
            signals=signals,
        )
        self.status = SUCCEEDED
        self.value: JSONValue = None
        self.error_type = ""
        self.error_message = ""
        self.traceback = ""
        self.stage = ""
        self.hooks_run = 0

    def run(self) -> dict[str, Any]:
        before = take_snapshot()
        began = time.perf_counter()
        failed = self._call()
        seconds = time.perf_counter() - began
        report = self._measure(before, kill_new_children(before), failed)
        if not report.reclaimed and self.drain_if_held:
            # The controller recycles this engine: what is queued behind must not start.
            BOOK.drain(f"the engine is being recycled: {report.summary}")
        self.ctx._close()
        return {
            "status": self.status,
            "value": self.value,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "traceback": self.traceback,
            "stage": self.stage,
            "output": self.ctx.output,
            "output_truncated": self.ctx.output_truncated,
            "resources": report.as_dict(),
            "hooks_run": self.hooks_run,
            "published": self.ctx.published,
            "seconds": seconds,
        }

    def _call(self) -> bool:
        """Run the task; fill in status, value and error. True when it did not succeed."""
        try:
            registered = registry.get(self.name)
        except registry.UnknownTaskError as exc:
            self._fail("UnknownTask", str(exc))
            return False  # nothing ran: nothing to clean up
        self.signals.cooperative = registered.cooperative
        error = _invoke(registered, self.args, self.ctx, self.signals)
        if isinstance(error, _Returned):
            try:
                self.value = to_json_value(error.value, "result")
            except TypeError as exc:
                self._fail("ResultNotSerializable", f"{self.name} returned non-JSON data: {exc}")
                del error
                return True
            return False
        if isinstance(error, (KeyboardInterrupt, TaskTerminated)):
            self.status = INTERRUPTED
            self.stage = "SIGTERM" if isinstance(error, TaskTerminated) else "SIGINT"
            self._run_hooks()
        else:
            self.status = FAILED
        self.error_type = type(error).__name__
        self.error_message = _message(error)
        self.traceback = format_exception(error, _HIDDEN_CODES)
        drop_exception(error)
        del error
        return True

    def _run_hooks(self) -> None:
        hooks = self.ctx._take_hooks()
        if not hooks:
            return

        def started(hook: Callable[[], object]) -> None:
            self.hooks_run += 1

        def failed(hook: Callable[[], object], exc: BaseException) -> None:
            self.ctx._note(
                f"[tether] on_interrupt hook {_describe(hook)} raised "
                f"{type(exc).__name__}: {_message(exc)}\n"
            )
            drop_exception(exc)

        try:
            call_hooks(self.signals, hooks, started, failed)
        except TaskTerminated as exc:
            self.stage = "SIGTERM"
            skipped = len(hooks) - self.hooks_run
            self.ctx._note(f"[tether] SIGTERM during on_interrupt hooks; {skipped} not run\n")
            drop_exception(exc)

    def _fail(self, error_type: str, message: str) -> None:
        self.status = FAILED
        self.value = None
        self.error_type = error_type
        self.error_message = message

    def _measure(self, before: Snapshot, children: ChildCleanup, failed: bool) -> ResourceReport:
        """Compare with ``before``; collect garbage first only when it would change the verdict.

        The failed task's frames are gone by now, so its memory went back by reference
        counting. A full ``gc.collect()`` costs tens of milliseconds in a kernel (75 ms
        measured on a loaded 2-core VM), which every interrupt would pay; it runs only when
        memory still looks held (cycles, allocator caches), and then the figures are taken
        again.
        """
        if failed:
            release_cuda_cache()

        def report() -> ResourceReport:
            return ResourceReport(
                before,
                take_snapshot(children=False),  # the children are in ``children``
                children.killed,
                self.rss_tolerance,
                self.gpu_tolerance,
                surviving_children=children.survived,
            )

        measured = report()
        if not measured.memory_reclaimed:
            release_memory()
            measured = report()
        return measured


class _Returned:
    """The task function returned ``value`` (distinct from an exception object it returned)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _invoke(
    registered: registry.RegisteredTask, args: Any, ctx: TaskContext, signals: TaskSignals
) -> _Returned | BaseException:
    """Bind the arguments and call the task; return what came back or what was raised."""
    try:
        kwargs = registry.bind_args(registered, args)
        if registered.takes_context:
            kwargs[registry.CONTEXT_PARAMETER] = ctx
        return _Returned(call_task(signals, registered.function, kwargs))
    except BaseException as exc:
        return exc


# Frames of the runtime itself, left out of the traceback a client sees.
_HIDDEN_CODES: Final = RUNTIME_CODES | {_invoke.__code__, TaskContext.check.__code__}


def _message(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception as str_error:
        return f"<str() failed: {str_error!r}>"
    if not text and isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return text


def _describe(hook: Callable[[], object]) -> str:
    return str(getattr(hook, "__qualname__", None) or repr(hook))


def _internal_error_outcome(exc: BaseException) -> dict[str, Any]:
    try:
        text = format_exception(exc, frozenset())
        message = _message(exc)
        drop_exception(exc)
    except BaseException:
        text, message = "", "unknown"
    del exc
    return {
        "status": FAILED,
        "value": None,
        "error_type": "TetherRuntimeError",
        "error_message": f"tether runtime failed: {message}",
        "traceback": text,
        "stage": "",
        "output": "",
        "output_truncated": False,
        "resources": {
            "rss_before_bytes": 0,
            "rss_after_bytes": 0,
            "gpu_allocated_before_bytes": 0,
            "gpu_allocated_after_bytes": 0,
            "gpu_reserved_after_bytes": 0,
            "leftover_children": 0,
            "reclaimed": False,
            "summary": "not measured: the runtime failed",
        },
        "hooks_run": 0,
    }
