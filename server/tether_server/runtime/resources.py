"""Measuring what a task used, and taking back what a failed task left behind.

Around every task the runtime takes a :class:`Snapshot` (engine RSS, descendant
processes, CUDA memory when torch already uses CUDA) and compares the one after with
the one before. An engine that did not get its resources back within the configured
tolerances is reported as not *reclaimed*, and the controller recycles it.

Why frames matter (notes/gpu.md): an exception's traceback holds every frame of the
failed task, and with them every local: the KV cache of an interrupted decode loop
stayed allocated until ``sys.last_*`` and the frames were dropped. :func:`drop_exception`
does that; :func:`release_memory` then collects and returns cached memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Final, NamedTuple

import psutil

__all__ = [
    "ChildCleanup",
    "ResourceReport",
    "Snapshot",
    "drop_exception",
    "format_exception",
    "ipython_shell",
    "kill_new_children",
    "register_service_thread",
    "release_cuda_cache",
    "release_memory",
    "take_snapshot",
]

_MAX_TRACEBACK_CHARS: Final = 64 * 1024
_MiB: Final = 1024 * 1024
_PROCESS: psutil.Process | None = None
_PROC_FS: Final = os.path.exists("/proc/self/statm")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SERVICE_THREADS: set[int] = set()


def _process() -> psutil.Process:
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():  # also right after a fork
        _PROCESS = psutil.Process()
    return _PROCESS


# --------------------------------------------------------------------------- resident memory
ResidentProbe = Callable[[], tuple[int, int]]
_RESIDENT_PROBES: list[ResidentProbe] = []


def register_resident_probe(probe: ResidentProbe) -> None:
    """Declare memory an engine keeps on purpose between tasks (a model cache).

    ``probe()`` returns (host bytes, GPU bytes) held deliberately right now. Growth
    of that memory during a task is not a leak: a serving engine that loads a
    model's weights once must not be recycled for it.
    """
    if probe not in _RESIDENT_PROBES:
        _RESIDENT_PROBES.append(probe)


def _resident() -> tuple[int, int]:
    host = gpu = 0
    for probe in _RESIDENT_PROBES:
        with contextlib.suppress(Exception):
            h, g = probe()
            host += int(h)
            gpu += int(g)
    return host, gpu


# --------------------------------------------------------------------------- snapshots
@dataclass(frozen=True, slots=True)
class Snapshot:
    """The engine's resources at one moment."""

    rss_bytes: int
    gpu_allocated_bytes: int
    gpu_reserved_bytes: int
    children: frozenset[tuple[int, float]]
    """Descendant processes as (pid, create time): a reused pid is a different process."""
    resident_host_bytes: int = 0
    resident_gpu_bytes: int = 0
    """Memory declared as kept on purpose (register_resident_probe)."""
    last_pid: int | None = None
    """The newest pid of this pid namespace when ``children`` was listed (``_last_pid``)."""


def take_snapshot(*, children: bool = True) -> Snapshot:
    """Measure now; ``children=False`` skips listing descendant processes (empty set)."""
    allocated, reserved = _cuda_memory()
    host, gpu = _resident()
    last_pid, listed = _children_now() if children else (None, frozenset())
    return Snapshot(
        rss_bytes=_rss(),
        gpu_allocated_bytes=allocated,
        gpu_reserved_bytes=reserved,
        children=listed,
        resident_host_bytes=host,
        resident_gpu_bytes=gpu,
        last_pid=last_pid,
    )


_LISTED: tuple[int, frozenset[tuple[int, float]]] | None = None
"""The last listing of descendants and the newest pid read just before it."""


def _children_now() -> tuple[int | None, frozenset[tuple[int, float]]]:
    """(newest pid, descendants). The listing walks a ``children`` file per thread of
    every descendant; when no process (or thread) was created in this pid namespace
    since the last listing, the newest pid is unchanged and so are the descendants
    (bar exits, which a later kill tolerates): the last listing is reused."""
    global _LISTED
    last_pid = _last_pid()
    if last_pid is not None and _LISTED is not None and _LISTED[0] == last_pid:
        return last_pid, _LISTED[1]
    listed = frozenset(_descendants())
    if last_pid is not None:
        _LISTED = (last_pid, listed)
    return last_pid, listed


def _last_pid() -> int | None:
    """The pid most recently given out in this pid namespace (``/proc/loadavg``, field 5);
    None off Linux. Every new process or thread takes a new pid here, its descendants'
    included (a nested namespace's processes have a pid in this one too)."""
    if not _PROC_FS:
        return None
    try:
        with open("/proc/loadavg", "rb") as handle:
            return int(handle.read().split()[4])
    except (OSError, ValueError, IndexError):
        return None


def _loaded_cuda_torch() -> ModuleType | None:
    """torch, when the task side already imported it *and* initialised CUDA; never imports."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_initialized() else None
    except Exception:
        return None


def _cuda_memory() -> tuple[int, int]:
    """(allocated, reserved) bytes summed over the visible devices; (0, 0) without CUDA."""
    torch = _loaded_cuda_torch()
    if torch is None:
        return 0, 0
    allocated = reserved = 0
    try:
        for device in range(torch.cuda.device_count()):
            allocated += int(torch.cuda.memory_allocated(device))
            reserved += int(torch.cuda.memory_reserved(device))
    except Exception:
        return 0, 0
    return allocated, reserved


def _rss() -> int:
    """This process's resident set size: one read of ``/proc/self/statm`` on Linux."""
    if _PROC_FS:
        try:
            with open("/proc/self/statm", "rb") as handle:
                return int(handle.read().split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            pass
    return int(_process().memory_info().rss)


def register_service_thread(thread: threading.Thread) -> None:
    """Processes ``thread`` starts are the runtime's own (the load thread's nvidia-smi):
    never a task's leftovers, so never listed as descendants nor killed."""
    if thread.native_id is not None:
        _SERVICE_THREADS.add(thread.native_id)


def _descendants() -> set[tuple[int, float]]:
    """Descendant processes as (pid, start time): the pair names one process."""
    pids = _descendant_pids_from_proc()
    if pids is None:  # no /proc/<pid>/task/<tid>/children: ask psutil (scans every process)
        try:
            pids = [child.pid for child in _process().children(recursive=True)]
        except psutil.Error:
            return set()
    found: set[tuple[int, float]] = set()
    for pid in pids:
        started = _start_time(pid)
        if started is not None:
            found.add((pid, started))
    return found


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (None: gone). Linux: clock ticks since boot, read from
    ``/proc/<pid>/stat`` (field 22) without psutil's per-call boot-time read; elsewhere
    psutil's create time. Only ever compared with itself."""
    if _PROC_FS:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                data = handle.read()
            return float(data[data.rindex(b")") + 2 :].split()[19])
        except (OSError, ValueError, IndexError):
            return None
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _descendant_pids_from_proc() -> list[int] | None:
    """Descendants via Linux's per-thread ``children`` files: O(descendants), not O(processes).

    None where the kernel lacks those files (then psutil scans every process instead).
    The children of the runtime's service threads (``register_service_thread``) are left
    out, and with them their descendants.
    """
    me = os.getpid()
    if not os.path.exists(f"/proc/{me}/task/{me}/children"):
        return None
    found: list[int] = []
    frontier = [me]
    while frontier:
        pid = frontier.pop()
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:  # exited meanwhile
            continue
        for tid in threads:
            if pid == me and int(tid) in _SERVICE_THREADS:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                    words = handle.read().split()
            except OSError:  # the thread ended meanwhile
                continue
            children = [int(word) for word in words]
            found.extend(children)
            frontier.extend(children)
    return found


# --------------------------------------------------------------------------- children
class ChildCleanup(NamedTuple):
    """What ``kill_new_children`` found and did."""

    killed: int
    """Live descendants that were not there before: each got SIGTERM, then SIGKILL."""
    survived: int
    """Of those, the ones still alive ``grace`` seconds after SIGKILL (uninterruptible
    sleep, another pid namespace's init...)."""


def kill_new_children(before: Snapshot, *, grace: float = 1.0) -> ChildCleanup:
    """Stop every descendant process that was not there in ``before``.

    Zombies (already exited, not yet reaped) are reaped but not counted. Live ones get
    SIGTERM, ``grace`` seconds, then SIGKILL.
    """
    alive: list[psutil.Process] = []
    # Nothing created since ``before`` (the same newest pid): the same listing, no walk.
    for pid, created in _children_now()[1] - before.children:
        try:
            child = psutil.Process(pid)
            if _start_time(pid) != created:
                continue
            if child.status() == psutil.STATUS_ZOMBIE:
                _reap(pid)
                continue
            alive.append(child)
        except psutil.Error:
            continue
    if not alive:
        return ChildCleanup(0, 0)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace)
    for child in stubborn:
        with contextlib.suppress(psutil.Error):
            child.kill()
    _, survivors = psutil.wait_procs(stubborn, timeout=grace)
    for child in alive:
        _reap(child.pid)
    return ChildCleanup(len(alive), len(survivors))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------- errors
def format_exception(exc: BaseException, hidden: frozenset[Any]) -> str:
    """The traceback text of ``exc`` without the runtime's own frames (code objects in ``hidden``)."""
    for link in _chain(exc):
        link.__traceback__ = _strip(link.__traceback__, hidden)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception as format_error:  # a broken __str__, say
        text = f"{type(exc).__name__} (traceback unavailable: {format_error!r})\n"
    if len(text) > _MAX_TRACEBACK_CHARS:
        half = _MAX_TRACEBACK_CHARS // 2
        text = text[:half] + "\n... traceback shortened ...\n" + text[-half:]
    return text


def drop_exception(exc: BaseException) -> None:
    """Let go of every frame ``exc`` keeps alive, and of the interpreter's and kernel's copies.

    Clears the frames of each traceback in the exception chain (their locals go), cuts the
    chain, and forgets ``sys.last_*`` and IPython's stored traceback, which would otherwise
    keep an interrupted task's memory (GPU memory included) alive.
    """
    for link in _chain(exc):
        tb = link.__traceback__
        if tb is not None:
            traceback.clear_frames(tb)
        link.__traceback__ = None
        link.__context__ = None
        link.__cause__ = None
    forget_last_exception()


def forget_last_exception() -> None:
    """Drop ``sys.last_*`` and the traceback IPython keeps for ``%debug``."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            with contextlib.suppress(AttributeError):
                delattr(sys, name)
    shell = ipython_shell()
    if shell is None:
        return
    for formatter_name in ("InteractiveTB", "SyntaxTB"):
        formatter = getattr(shell, formatter_name, None)
        if formatter is not None and getattr(formatter, "tb", None) is not None:
            with contextlib.suppress(Exception):
                formatter.tb = None
    with contextlib.suppress(Exception):
        if getattr(shell, "_last_traceback", None) is not None:
            shell._last_traceback = None


def ipython_shell() -> Any:
    """The running IPython shell, found without importing IPython; None outside one."""
    module = sys.modules.get("IPython.core.interactiveshell")
    if module is None:
        return None
    shell_class = getattr(module, "InteractiveShell", None)
    try:
        if shell_class is not None and shell_class.initialized():
            return shell_class.instance()
    except Exception:
        return None
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception reachable through cause, context and groups."""
    seen: dict[int, BaseException] = {}
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        stack.extend(getattr(current, "exceptions", ()) or ())
    return list(seen.values())


def _strip(tb: TracebackType | None, hidden: frozenset[Any]) -> TracebackType | None:
    """Drop leading and trailing traceback entries whose code is in ``hidden``."""
    while tb is not None and tb.tb_frame.f_code in hidden:
        tb = tb.tb_next
    if tb is None:
        return None
    last_kept = tb
    cursor = tb.tb_next
    while cursor is not None:
        if cursor.tb_frame.f_code not in hidden:
            last_kept = cursor
        cursor = cursor.tb_next
    last_kept.tb_next = None
    return tb


# --------------------------------------------------------------------------- memory
def release_memory() -> None:
    """Collect garbage, give freed heap back to the OS and empty torch's CUDA cache."""
    gc.collect()
    _malloc_trim()
    release_cuda_cache()


def release_cuda_cache() -> None:
    """Hand the blocks torch's caching allocator keeps back to the driver (if CUDA is in use)."""
    torch = _loaded_cuda_torch()
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


_LIBC: ctypes.CDLL | None = None
_LIBC_LOOKED_UP = False


def _malloc_trim() -> None:
    """glibc keeps freed small allocations in its arenas; ``malloc_trim`` hands them back."""
    global _LIBC, _LIBC_LOOKED_UP
    if not _LIBC_LOOKED_UP:
        _LIBC_LOOKED_UP = True
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        if name is not None:
            with contextlib.suppress(OSError):
                _LIBC = ctypes.CDLL(name)
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.malloc_trim(0)


# --------------------------------------------------------------------------- report
@dataclass(frozen=True, slots=True)
class ResourceReport:
    """Before/after figures for one attempt (the ``resources`` of the outcome)."""

    before: Snapshot
    after: Snapshot
    leftover_children: int
    rss_tolerance_bytes: int
    gpu_tolerance_bytes: int
    surviving_children: int = 0
    """Leftover children still alive after SIGKILL (``ChildCleanup.survived``)."""

    @property
    def rss_growth(self) -> int:
        """RSS growth, less memory declared resident (a model cache filled by this task)."""
        resident = self.after.resident_host_bytes - self.before.resident_host_bytes
        return self.after.rss_bytes - self.before.rss_bytes - max(0, resident)

    @property
    def gpu_growth(self) -> int:
        resident = self.after.resident_gpu_bytes - self.before.resident_gpu_bytes
        return self.after.gpu_allocated_bytes - self.before.gpu_allocated_bytes - max(0, resident)

    @property
    def memory_reclaimed(self) -> bool:
        """RSS and CUDA memory grew no more than their tolerances."""
        return (
            self.rss_growth <= self.rss_tolerance_bytes
            and self.gpu_growth <= self.gpu_tolerance_bytes
        )

    @property
    def reclaimed(self) -> bool:
        """Memory came back and no child process was left behind."""
        return self.memory_reclaimed and self.surviving_children == 0

    def summary(self) -> str:
        parts = [f"rss {_signed_mib(self.rss_growth)} (tolerance {_mib(self.rss_tolerance_bytes)})"]
        if self.before.gpu_allocated_bytes or self.after.gpu_allocated_bytes:
            parts.append(
                f"gpu allocated {_signed_mib(self.gpu_growth)} "
                f"(tolerance {_mib(self.gpu_tolerance_bytes)}), "
                f"reserved {_mib(self.after.gpu_reserved_bytes)}"
            )
        parts.append(f"{self.leftover_children} leftover child process(es) killed")
        if self.surviving_children:
            parts.append(f"{self.surviving_children} survived SIGKILL")
        verdict = "reclaimed" if self.reclaimed else "NOT reclaimed"
        return f"{verdict}: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rss_before_bytes": self.before.rss_bytes,
            "rss_after_bytes": self.after.rss_bytes,
            "gpu_allocated_before_bytes": self.before.gpu_allocated_bytes,
            "gpu_allocated_after_bytes": self.after.gpu_allocated_bytes,
            "gpu_reserved_after_bytes": self.after.gpu_reserved_bytes,
            "leftover_children": self.leftover_children,
            "reclaimed": self.reclaimed,
            "summary": self.summary(),
        }


def _mib(n: int) -> str:
    return f"{n / _MiB:.1f} MiB"


def _signed_mib(n: int) -> str:
    return f"{n / _MiB:+.1f} MiB"
