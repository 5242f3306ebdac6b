"""What every bench shares: environment, timing, statistics, A/B alternation, the raw
ipyparallel cluster and the tether server they run against, the table and the JSON file.

Rules it carries out (shared/BENCHMARKS.md): intervals are taken with
``time.perf_counter_ns``; every figure is set against a baseline measured in the same
run on the same box, the two alternated (A B A B ...) after a warm-up; a missed target
is printed as ``MISSED`` with what was measured, never left out.

The raw cluster and the tether server are started once per run, on first use, and
shared by the benches; a bench that may break a cluster (B7's raw SIGINT storm) gets
one of its own from :meth:`Session.private_raw_cluster`. Every process started here is
stopped by PID in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tests.support import REPO, ServerProcess

from .probes import PySpy, summarise
from .tether_client import Tether

now_ns = time.perf_counter_ns
"""The bench clock."""

MS = 1e6
"""Nanoseconds per millisecond."""

_N = TypeVar("_N", int, float)


# --------------------------------------------------------------------------- statistics
def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True, slots=True)
class Summary:
    """Order statistics of one series of samples, in the unit they were given in."""

    n: int
    median: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            len(values),
            statistics.median(values),
            percentile(values, 90),
            percentile(values, 99),
            min(values),
            max(values),
        )

    @classmethod
    def of_ns(cls, samples_ns: list[int]) -> Summary:
        """Summary in milliseconds of samples in nanoseconds."""
        return cls.of([s / MS for s in samples_ns])

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self, unit: str = "ms") -> str:
        return (
            f"median {self.median:.2f} {unit}, p90 {self.p90:.2f}, p99 {self.p99:.2f}, "
            f"min {self.min:.2f}, max {self.max:.2f} (n={self.n})"
        )


async def alternate(
    pairs: int,
    baseline: Callable[[int], Awaitable[None]],
    tether: Callable[[int], Awaitable[None]],
    *,
    warmup: int = 0,
) -> None:
    """Run ``warmup`` unrecorded pairs, then ``pairs`` pairs, A B A B ...

    Each callable records its own sample; it gets the pair index (negative during the
    warm-up, so it knows not to record).
    """
    for i in range(-warmup, pairs):
        await baseline(i)
        await tether(i)


# --------------------------------------------------------------------------- results
@dataclass(slots=True)
class Row:
    """One line of the table: one measured figure against its baseline and target."""

    bench: str
    metric: str
    baseline: float | None
    tether: float | None
    unit: str
    samples: str
    target: str
    met: bool | None
    """None: a figure reported for information, with no target of its own."""
    ratio: float | None = None
    """tether / baseline; computed when both are there and not given."""
    why: str = ""
    """For a miss: what was measured against what was asked, in words."""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline and self.tether is not None:
            self.ratio = self.tether / self.baseline

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "info"
        return "met" if self.met else "MISSED"


@dataclass(slots=True)
class BenchResult:
    """What one bench returns: its rows and every detail worth keeping in the JSON."""

    bench: str
    title: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def say(text: str) -> None:
    """A detail line of the running bench (indented under its header)."""
    print(f"    {text}", flush=True)


def _figure(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("tasks/s", "events", "tasks", "engines"):
        return f"{value:.0f} {unit}"
    if abs(value) >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.2f} {unit}" if abs(value) < 10 else f"{value:.1f} {unit}"


def format_table(results: list[BenchResult]) -> str:
    header = ("id", "metric", "baseline", "tether", "ratio", "samples", "target", "result")
    lines: list[tuple[str, ...]] = [header]
    for result in results:
        if result.error:
            lines.append((result.bench, result.title, "-", "-", "-", "-", "-", "ERROR"))
        for row in result.rows:
            ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
            lines.append(
                (
                    row.bench,
                    row.metric,
                    _figure(row.baseline, row.unit),
                    _figure(row.tether, row.unit),
                    ratio,
                    row.samples,
                    row.target,
                    row.verdict,
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    misses = [r for res in results for r in res.rows if r.met is False]
    for row in misses:
        out.append(f"MISSED {row.bench} {row.metric}: {row.why or row.target}")
    for res in results:
        if res.error:
            out.append(f"ERROR {res.bench}: {res.error}")
    return "\n".join(out)


def environment() -> dict[str, Any]:
    import grpc
    import ipyparallel

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "ipyparallel": ipyparallel.__version__,
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def format_environment(env: dict[str, Any]) -> str:
    return (
        f"date {env['date']} | Python {env['python']} | grpcio {env['grpcio']} | "
        f"ipyparallel {env['ipyparallel']} | {env['cores']} cores ({env['cpu']}) | "
        f"load {env['load_average_1m']} | {env['platform']}"
    )


def write_json(path: Path, env: dict[str, Any], quick: bool, results: list[BenchResult]) -> None:
    def clean(value: Any) -> Any:  # NaN is not JSON
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    document = {
        "environment": env,
        "quick": quick,
        "results": [
            {**asdict(r), "rows": [{**asdict(row), "verdict": row.verdict} for row in r.rows]}
            for r in results
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(document), indent=2) + "\n")


# --------------------------------------------------------------------------- raw cluster
class RawCluster:
    """A raw ipyparallel cluster, for baselines: 2 local engines, DirectView.

    The only place in bench/ that starts ipyparallel. Started and stopped on the
    running asyncio loop (the launchers need it); every process it started is
    SIGKILLed by PID after ``stop_cluster`` if it is still there.
    """

    def __init__(self, profile_dir: Path, engines: int = 2) -> None:
        self.profile_dir = profile_dir
        self.engines = engines
        self.cluster: Any = None
        self.client: Any = None
        self._procs: dict[int, psutil.Process] = {}

    async def start(self) -> RawCluster:
        import ipyparallel as ipp

        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = ipp.Cluster(
            n=self.engines,
            controller_ip="127.0.0.1",
            controller_args=["--HeartMonitor.period=500"],
            delay=0,
            profile_dir=str(self.profile_dir),
            log_level=logging.ERROR,
        )
        try:
            self.client = await asyncio.wait_for(
                self.cluster.start_and_connect(self.engines), timeout=90
            )
        finally:
            self.remember_processes()
        return self

    def remember_processes(self) -> None:
        """Note every process of the cluster (call again after starting engines)."""
        cluster = self.cluster
        if cluster is None:
            return
        launchers = []
        if cluster.controller is not None:
            launchers.append(cluster.controller)
        for engine_set in cluster.engines.values():
            launchers.extend(getattr(engine_set, "launchers", {}).values())
        for launcher in launchers:
            proc = getattr(launcher, "process", None)
            if proc is None:
                continue
            with contextlib.suppress(psutil.Error):
                for p in [proc, *proc.children(recursive=True)]:
                    self._procs.setdefault(p.pid, p)

    def processes(self) -> list[psutil.Process]:
        """The cluster's processes (controller, engines, nannies) still running."""
        self.remember_processes()
        return [p for p in self._procs.values() if p.is_running()]

    def engine_pids(self) -> dict[int, int]:
        """Engine id -> pid, asked of the engines themselves."""
        from .engine_tasks import engine_pid

        return {
            int(k): int(v)
            for k, v in self.client[:].apply_async(engine_pid).get_dict(timeout=30).items()
        }

    def view(self, engine_id: int) -> Any:
        return self.client[engine_id]

    async def start_engine(self, engine_id: int) -> None:
        """Start one engine asking for ``engine_id`` (ipyparallel has no restart)."""
        await self.cluster.start_engines(1, engine_args=[f"--IPEngine.id={engine_id}"])
        self.remember_processes()

    async def stop(self) -> None:
        self.remember_processes()
        try:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.cluster.stop_cluster(), timeout=15)
        finally:
            for proc in self._procs.values():
                with contextlib.suppress(psutil.Error):
                    if proc.is_running():
                        proc.kill()
            self._procs.clear()
            self.cluster = self.client = None


# --------------------------------------------------------------------------- tether server
class TetherServer:
    """A tether-server subprocess (``tests.support.ServerProcess``) and a channel to it."""

    def __init__(
        self, data_dir: Path, engines: int = 2, extra_args: list[str] | None = None
    ) -> None:
        # bench.tether_tasks must import on the server and on its engines.
        path = os.environ.get("PYTHONPATH", "")
        if str(REPO) not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
        args = ["--task-module", "bench.tether_tasks", *(extra_args or [])]
        self.process = ServerProcess(data_dir, engines=engines, extra_args=args)
        self.engines = engines
        self.client: Tether | None = None

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    async def start(self) -> Tether:
        await asyncio.to_thread(self.process.start, 120.0)
        self.client = Tether(self.process.address)
        await self.client.wait_idle_engines(self.engines, timeout=120)
        return self.client

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    async def stop(self) -> None:
        try:
            if self.client is not None:
                with contextlib.suppress(Exception):
                    await self.client.close()
        finally:
            await asyncio.to_thread(self.process.stop)
            self.process.kill_leftovers()


# --------------------------------------------------------------------------- session
class Session:
    """One ``python -m bench`` run: options, scratch directory and the shared processes."""

    def __init__(self, workdir: Path, *, quick: bool, profile_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.quick = quick
        self.profile_dir = profile_dir
        self._raw: RawCluster | None = None
        self._server: TetherServer | None = None
        self._profiler: PySpy | None = None
        self._private = 0

    def size(self, full: _N, quick: _N) -> _N:
        """``quick`` under ``--quick``, else ``full``."""
        return quick if self.quick else full

    async def raw(self) -> RawCluster:
        if self._raw is None:
            t0 = now_ns()
            cluster = RawCluster(self.workdir / "raw-profile")
            self._raw = cluster
            await cluster.start()
            say(f"(raw ipyparallel cluster started in {(now_ns() - t0) / 1e9:.1f} s)")
        return self._raw

    async def server(self) -> TetherServer:
        if self._server is None:
            t0 = now_ns()
            server = TetherServer(self.workdir / "tether" / "data")
            self._server = server
            await server.start()
            say(f"(tether-server pid {server.pid} started in {(now_ns() - t0) / 1e9:.1f} s)")
            if self.profile_dir is not None:
                self._profiler = PySpy(server.pid, self.profile_dir)
                say(f"(py-spy recording the server into {self._profiler.raw})")
        return self._server

    async def tether(self) -> Tether:
        server = await self.server()
        assert server.client is not None
        return server.client

    @contextlib.asynccontextmanager
    async def private_raw_cluster(self) -> AsyncIterator[RawCluster]:
        """A raw cluster of the caller's own, stopped (and its processes killed) on exit."""
        self._private += 1
        cluster = RawCluster(self.workdir / f"raw-private-{self._private}")
        try:
            await cluster.start()
            yield cluster
        finally:
            await cluster.stop()

    async def close(self) -> None:
        try:
            if self._raw is not None:
                await self._raw.stop()
        finally:
            self._raw = None
            if self._profiler is not None:
                await asyncio.to_thread(self._profiler.stop)
                print(f"\nserver profile ({self._profiler.raw}):\n{summarise(self._profiler.raw)}")
                self._profiler = None
            if self._server is not None:
                await self._server.stop()
            self._server = None


RUN_MARKER = "TETHER_BENCH_RUN"
"""Environment variable set for the run; every process it starts inherits it."""


def mark_run() -> str:
    """Mark this run's processes; a marker set by a caller (a test) is kept."""
    nonce = os.environ.get(RUN_MARKER) or uuid.uuid4().hex
    os.environ[RUN_MARKER] = nonce
    return nonce


def leftover_processes(nonce: str) -> list[psutil.Process]:
    """Processes still alive that this run started (they carry its marker), bench excluded."""
    needle = f"{RUN_MARKER}={nonce}"
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if f"{RUN_MARKER}={env.get(RUN_MARKER, '')}" == needle:
                found.append(proc)
    return found


__all__ = [
    "MS",
    "BenchResult",
    "RawCluster",
    "Row",
    "Session",
    "Summary",
    "TetherServer",
    "alternate",
    "environment",
    "format_environment",
    "format_table",
    "leftover_processes",
    "mark_run",
    "now_ns",
    "percentile",
    "say",
    "write_json",
]
