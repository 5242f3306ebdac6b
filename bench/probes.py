"""What the processes were doing while a bench ran: loop lag, CPU shares, py-spy samples.

:class:`LoopLagProbe` times this process's event loop; :class:`CpuMeter` splits the CPU
used over an interval between the tether server, its cluster, the bench and the box.

``--py-spy DIR``: sample the tether server while the benches run, then summarise.

py-spy (``pip install py-spy``) records the server process from outside, GIL holder or
not (``--idle`` off: only frames on CPU count), without pausing it (``--nonblocking``).
The collapsed stacks go to ``DIR/server.txt`` (``flamegraph.pl`` or speedscope read
them); :func:`summarise` prints the functions with the largest share of samples,
inclusive and self.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

MS = 1e6


class LoopLagProbe:
    """How late this process's event loop wakes up from a 5 ms sleep (ms)."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter_ns()
            await asyncio.sleep(self.period)
            self.lags_ms.append(
                max(0.0, (time.perf_counter_ns() - start) / MS - self.period * 1000)
            )

    def __enter__(self) -> LoopLagProbe:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


class CpuMeter:
    """CPU used over an interval: the tether server, its cluster, this process, the box.

    Shares are of one core (100 % = one core busy); ``box`` is of all cores. On a
    shared 2-core machine this tells a slow server apart from a starved one.
    """

    def __init__(
        self, server_pid: int | None, extra: dict[str, list[psutil.Process]] | None = None
    ) -> None:
        self.server_pid = server_pid
        self.extra = extra or {}
        self.shares: dict[str, float] = {}

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {"bench client": [psutil.Process()]}
        if self.server_pid is not None:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self.server_pid)
                groups["tether server"] = [server]
                groups["its cluster"] = server.children(recursive=True)
        return groups | self.extra

    def __enter__(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._groups0 = self._groups()
        self._start = {k: self._cpu(v) for k, v in self._groups0.items()}
        psutil.cpu_percent()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        for name, procs in self._groups0.items():
            self.shares[name] = 100 * (self._cpu(procs) - self._start[name]) / wall
        self.shares["box (all cores)"] = psutil.cpu_percent()

    def text(self) -> str:
        return ", ".join(f"{k} {v:.0f}%" for k, v in self.shares.items())


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic GC pauses in this process while measuring (a full collection over the
    received messages would show up as delivery lag that is the bench's own)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def py_spy_binary() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """A ``py-spy record`` process attached to one pid; stopped with SIGINT."""

    def __init__(self, pid: int, out_dir: Path, rate: int = 250) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.raw = out_dir / "server.txt"
        command = [binary, "record", "--format", "raw", "-o", str(self.raw)]
        command += ["--pid", str(pid), "--rate", str(rate), "--nonblocking"]
        self._procs = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ]

    def stop(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


_THREADS = (
    ("store writer thread", "GroupWriter._run_writer"),
    ("ipyparallel client IO thread", "Client._io_main"),
    ("event loop (main thread)", "main (tether_server/app.py)"),
)


def summarise(raw: Path, top: int = 20) -> str:
    """Where the samples went: by thread, by event-loop callback, by function."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    callbacks: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        thread = next((name for name, mark in _THREADS if mark in frames), "other threads")
        threads[thread] += count
        if thread.startswith("event loop"):
            callbacks[_callback(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    if not total:
        return "no samples"

    def share(counter: collections.Counter[str], n: int) -> list[str]:
        return [f"  {100 * c / total:5.1f}%  {f}" for f, c in counter.most_common(n)]

    lines = [f"{total} samples on CPU; by thread:", *share(threads, 10)]
    lines += ["event loop, by callback (the frame the loop called):", *share(callbacks, top)]
    lines += ["inclusive, by function:", *share(inclusive, top)]
    lines += ["self, by function:", *share(own, top)]
    return "\n".join(lines)


def _callback(frames: list[str]) -> str:
    """The first frame under the loop's ``Handle._run``: which callback or task ran."""
    for i, frame in enumerate(frames):
        if frame.startswith("Handle._run ") and i + 1 < len(frames):
            return frames[i + 1]
    return (
        frames[-1] if frames[-1].startswith(("EpollSelector", "BaseEventLoop")) else "(loop itself)"
    )


def _short(frame: str) -> str:
    """``function (path/to/module.py:LINE)`` -> ``function (module.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
