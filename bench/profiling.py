"""``--py-spy DIR``: sample the tether server while the benches run, then summarise.

py-spy (``pip install py-spy``) records the server process from outside, GIL holder or
not (``--idle`` off: only frames on CPU count), without pausing it (``--nonblocking``).
The collapsed stacks go to ``DIR/server.txt`` (``flamegraph.pl`` or speedscope read
them); :func:`summarise` prints the functions with the largest share of samples,
inclusive and self.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path


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
    ("store writer thread", "SqliteStore._run_writer"),
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
