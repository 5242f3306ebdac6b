#!/usr/bin/env python3
"""One prepared GPU check of tether's interrupts (issue 5, item 5).

Starts a tether-server (embedded cluster) with the Python that runs this script, then:

(a) ``llm.generate``: a long generation (model ``large`` on CUDA, ``tiny`` on CPU) is
    interrupted once N tokens have streamed. Reported: the time from InterruptTask to
    INTERRUPTED seen on the task's stream, the final escalation stage, the task's
    ResourceReport (torch's GPU figures before/after, reclaimed, engine recycled),
    nvidia-smi's memory for the engine before / during / after, and whether the next
    (short) ``llm.generate`` started at once, and on which engine.
(b) ``llm.stuck_cuda(60)``: one GPU kernel (a C call on CPU) that only SIGKILL ends,
    interrupted with graces of 0.5 s (SIGINT) and 0.5 s (SIGTERM). Reported: the time to
    INTERRUPTED, the final stage (SIGKILL expected), when nvidia-smi stopped showing the
    killed engine's memory, when a replacement engine registered and became idle
    (GetCluster), and when the next task ran.

With ``--hf-shape 1b`` (issue 11) the model is a Hugging Face checkpoint instead: a
random-weight Llama of about 0.76 B parameters built here (bf16, ``hf_random``), served
with ``--model hf=DIR``; (a) runs on it, and (a') compares ``llm.generate`` tokens/s with a
raw transformers decode loop of the same checkpoint on the same device (A B A B).
The device's wheel directory must then hold transformers, tokenizers and safetensors.

Prints a report and writes JSON (``--out``); with ``--out`` the server's log is written
beside it (``<out stem>.server.log``). Every wait is bounded; the server is always
stopped (SIGTERM, then SIGKILL) and any engine left is killed by PID. Runs without
``pip install -e``: the server is ``sys.executable -m tether_server`` with PYTHONPATH
naming the repo's ``server/`` and ``clients/python/`` (the engines inherit it).

    python3 bench/gpu_check.py --device cuda --out results.json
    python3 bench/gpu_check.py --device cpu               # same path, no GPU numbers
    python3 bench/gpu_check.py --device cuda --hf-shape 1b --out hf.json   # transformers
    python3 bench/gpu_check.py --print-device-command     # the line for the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (REPO / "server", REPO / "clients" / "python")
for _path in reversed(SOURCE_DIRS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import grpc  # noqa: E402
import psutil  # noqa: E402
from google.protobuf import duration_pb2, json_format, struct_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tether.v1 import cluster_service_pb2 as cpb  # noqa: E402
from tether.v1 import cluster_service_pb2_grpc as cgrpc  # noqa: E402
from tether.v1 import task_pb2  # noqa: E402
from tether.v1 import task_service_pb2 as tpb  # noqa: E402
from tether.v1 import task_service_pb2_grpc as tgrpc  # noqa: E402

MiB = 1024 * 1024
PROMPT = "Interrupt me: "  # short: tiny has 2048 positions, prompt + tokens must fit
TERMINAL = {
    task_pb2.TASK_STATE_SUCCEEDED,
    task_pb2.TASK_STATE_FAILED,
    task_pb2.TASK_STATE_INTERRUPTED,
    task_pb2.TASK_STATE_TIMED_OUT,
    task_pb2.TASK_STATE_CANCELLED,
}
TASK_TIMEOUT_S = 600.0  # explicit per-task timeout, so the server's policy never interferes
RPC_TIMEOUT_S = 15.0

DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/server:$PWD/clients/python "
    "PYTHONUNBUFFERED=1 || exit; "
    "nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv; "
    "set -o pipefail; timeout 300 python3 bench/gpu_check.py --device cuda "
    "--out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log"
)
DEVICE_CARRY = [".whl"]


# --------------------------------------------------------------------------- small tools
def now() -> float:
    return time.perf_counter()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / MiB, 1)


def state_name(state: Any) -> str:
    return task_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")


def stage_name(stage: Any) -> str:
    return task_pb2.EscalationStage.Name(stage).removeprefix("ESCALATION_STAGE_")


def engine_state_name(state: Any) -> str:
    return cpb.EngineState.Name(state).removeprefix("ENGINE_STATE_")


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Budget:
    """The whole run's deadline; every wait is cut to what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.deadline = now() + seconds

    def left(self) -> float:
        return self.deadline - now()

    def cap(self, seconds: float) -> float:
        left = self.left()
        if left <= 0:
            raise TimeoutError("the run's time budget (--budget) is spent")
        return min(seconds, left)


def process_alive(pid: int) -> bool:
    """False once ``pid`` exited, a zombie (killed, not yet reaped) included."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- nvidia-smi
def nvidia_smi_available() -> bool:
    return shutil.which("nvidia-smi") is not None


def _smi(args: list[str]) -> list[list[str]] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_info() -> dict[str, Any] | None:
    if not nvidia_smi_available():
        return None
    rows = _smi(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    if not rows:
        return None
    return {"gpus": [{"name": r[0], "memory_total_mib": _num(r[1]), "driver": r[2]} for r in rows]}


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def gpu_sample(engine_pid: int | None = None) -> dict[str, Any] | None:
    """nvidia-smi now: total used MiB, MiB per compute process, the engine's MiB."""
    if not nvidia_smi_available():
        return None
    t = now()
    apps = _smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    gpus = _smi(["--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"])
    per_pid: dict[int, float] = {}
    for row in apps or []:
        if len(row) >= 2 and row[0].isdigit() and (value := _num(row[1])) is not None:
            per_pid[int(row[0])] = per_pid.get(int(row[0]), 0.0) + value
    used = sum(v for r in gpus or [] if (v := _num(r[0])) is not None) if gpus else None
    return {
        "used_mib": used,
        "per_pid_mib": {str(k): v for k, v in per_pid.items()},
        "engine_pid": engine_pid,
        "engine_mib": per_pid.get(engine_pid) if engine_pid is not None else None,
        "engine_listed": engine_pid in per_pid if engine_pid is not None else None,
        "query_ms": ms(now() - t),
    }


# --------------------------------------------------------------------------- server
class Server:
    """``sys.executable -m tether_server`` in its own session, stopped by PID."""

    def __init__(
        self,
        work: Path,
        engines: int,
        grace: tuple[float, float, float],
        extra_args: list[str] | None = None,
    ) -> None:
        self.extra_args = list(extra_args or [])
        self.work = work
        self.data_dir = work / "data"
        self.log_path = work / "server.log"
        self.engines = engines
        self.grace = grace
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        parts = [str(p) for p in SOURCE_DIRS]
        parts += [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in parts]
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout: float) -> float:
        """Start and wait for grpc.health SERVING; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sigint, sigterm, sigkill = self.grace
        cmd = [
            sys.executable, "-m", "tether_server",
            "--listen", self.address,
            "--engines", str(self.engines),
            "--data-dir", str(self.data_dir),
            "--grace-sigint", f"{sigint}s",
            "--grace-sigterm", f"{sigterm}s",
            "--grace-sigkill", f"{sigkill}s",
            "--task-module", "tether_server.tasks.llm",
            *self.extra_args,
        ]  # fmt: skip
        started = now()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.work,
                start_new_session=True,
            )  # fmt: skip
        deadline = now() + timeout
        last: object = None
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while now() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"tether-server exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        self.remember_children()
                        return now() - started
                    last = status.status
                except grpc.RpcError as exc:
                    last = exc.code()
                time.sleep(0.2)
        raise TimeoutError(f"tether-server not SERVING after {timeout:.0f}s (last: {last})")

    def remember_children(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            self.known_pids.update(c.pid for c in psutil.Process(self.proc.pid).children(True))

    def stop(self) -> int | None:
        """SIGTERM, 20 s, SIGKILL; then kill what is left of its cluster by PID."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        with contextlib.suppress(psutil.Error):
            self.known_pids.update(c.pid for c in psutil.Process(proc.pid).children(True))
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        leftovers = [p for p in self._cluster_processes() if p.pid != os.getpid()]
        for child in leftovers:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(leftovers, timeout=5)
        return proc.returncode

    def _cluster_processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for pid in self.known_pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = p
        marker = str(self.data_dir)
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if marker in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
        return list(found.values())

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --------------------------------------------------------------------------- stream watch
class TaskWatch(threading.Thread):
    """Follows one task's StreamTaskStatus in a thread, time-stamping what it sees."""

    TOKEN_RE = re.compile(r"token (\d+)/")

    def __init__(self, stub: tgrpc.TaskServiceStub, name: str, timeout: float) -> None:
        super().__init__(daemon=True, name=f"watch {name}")
        self.name_ = name
        self.cond = threading.Condition()
        self.call = stub.StreamTaskStatus(
            tpb.StreamTaskStatusRequest(name=name, send_initial_state=True), timeout=timeout
        )
        self.state = task_pb2.TASK_STATE_UNSPECIFIED
        self.task: task_pb2.Task | None = None
        self.output_events = 0
        self.output_chars = 0
        self.progress_tokens = 0
        self.progress_message = ""
        self.state_times: dict[str, float] = {}  # first time each state was seen
        self.stage_times: dict[str, float] = {}  # first time each escalation stage was seen
        self.terminal_at: float | None = None
        self.output_after: list[float] = []  # times of OUTPUT events (to count late tokens)
        self.ended = False
        self.error: str | None = None

    @property
    def tokens(self) -> int:
        return max(self.output_events, self.progress_tokens)

    def run(self) -> None:
        try:
            for resp in self.call:
                if not resp.HasField("task_event"):
                    continue
                t = now()
                ev = resp.task_event
                with self.cond:
                    self._note(t, ev)
                    self.cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # never die silently
            self.error = repr(exc)
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def _note(self, t: float, ev: tpb.TaskEvent) -> None:
        task = ev.task
        self.task = task
        self.state = task.state
        self.state_times.setdefault(state_name(task.state), t)
        if task.HasField("interrupt") and task.interrupt.stage:
            self.stage_times.setdefault(stage_name(task.interrupt.stage), t)
        if ev.type == tpb.TASK_EVENT_TYPE_OUTPUT:
            self.output_events += 1
            self.output_chars += len(ev.output_chunk)
            self.output_after.append(t)
        elif ev.type == tpb.TASK_EVENT_TYPE_SNAPSHOT:
            self.output_chars = len(task.output)
        if task.HasField("progress"):
            self.progress_message = task.progress.message
            m = self.TOKEN_RE.search(task.progress.message)
            if m:
                self.progress_tokens = max(self.progress_tokens, int(m.group(1)))
        if task.state in TERMINAL and self.terminal_at is None:
            self.terminal_at = t

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = now() + timeout
        with self.cond:
            while not predicate():
                if self.ended:
                    return predicate()
                left = deadline - now()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
            return True

    def wait_terminal(self, timeout: float) -> bool:
        return self.wait_for(lambda: self.terminal_at is not None, timeout)

    def close(self) -> None:
        self.call.cancel()
        self.join(5)


# --------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args: argparse.Namespace, server: Server, budget: Budget) -> None:
        self.args = args
        self.server = server
        self.budget = budget
        self.channel = grpc.insecure_channel(server.address)
        self.tasks = tgrpc.TaskServiceStub(self.channel)
        self.cluster = cgrpc.ClusterServiceStub(self.channel)
        self.gpu = args.device == "cuda"
        self.log: Callable[[str], None] = lambda line: print(line, flush=True)

    # ---------------------------------------------------------------- rpc helpers
    def submit(self, task: str, args: dict[str, Any]) -> str:
        s = struct_pb2.Struct()
        s.update(args)
        req = tpb.SubmitTaskRequest(task=task, args=s, timeout=duration(TASK_TIMEOUT_S))
        return str(self.tasks.SubmitTask(req, timeout=RPC_TIMEOUT_S).task.name)

    def get(self, name: str) -> task_pb2.Task:
        req = tpb.GetTaskRequest(name=name, view=task_pb2.TASK_VIEW_FULL)
        return self.tasks.GetTask(req, timeout=RPC_TIMEOUT_S).task

    def engines(self) -> list[cpb.Engine]:
        resp = self.cluster.GetCluster(cpb.GetClusterRequest(), timeout=RPC_TIMEOUT_S)
        self.server.remember_children()
        return list(resp.engines)

    def engine_pid(self, engine_id: int) -> int | None:
        for e in self.engines():
            if e.id == engine_id:
                return int(e.pid)
        return None

    def engine_table(self) -> list[dict[str, Any]]:
        return [
            {"id": e.id, "pid": e.pid, "state": engine_state_name(e.state), "tags": list(e.tags),
             "tasks_done": e.tasks_done}
            for e in self.engines()
        ]  # fmt: skip

    def wait_idle_engines(self, timeout: float) -> bool:
        """Until the pool holds its target of IDLE engines (after a recycle, say)."""
        deadline = now() + self.budget.cap(timeout)
        while now() < deadline:
            idle = [e for e in self.engines() if e.state == cpb.ENGINE_STATE_IDLE]
            if len(idle) >= self.args.engines:
                return True
            time.sleep(0.1)
        return False

    def watch(self, name: str, timeout: float) -> TaskWatch:
        w = TaskWatch(self.tasks, name, self.budget.cap(timeout))
        w.start()
        return w

    def generate_args(self, max_tokens: int, seed: int) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": self.args.temperature,
            "seed": seed,
            "model": self.args.model,
            "device": self.args.device,
            "checkpoint_every": self.args.checkpoint_every,
        }

    def run_to_end(self, task: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Submit, follow to a terminal state; the task's summary plus client-side times."""
        t_submit = now()
        name = self.submit(task, args)
        w = self.watch(name, timeout + 10)
        try:
            ended = w.wait_terminal(self.budget.cap(timeout))
        finally:
            w.close()
        summary = task_summary(self.get(name))
        running_at = w.state_times.get("RUNNING")
        summary["client"] = {
            "submit_to_running_ms": ms(running_at - t_submit) if running_at else None,
            "submit_to_end_ms": ms(w.terminal_at - t_submit) if w.terminal_at else None,
            "ended_in_time": ended,
            "stream_error": w.error,
        }
        return summary

    # ---------------------------------------------------------------- (a') tokens/s
    def scenario_compare(self, checkpoint: Path) -> dict[str, Any]:
        """tokens/s of llm.generate (submit -> end) against a raw transformers loop, A B A B.

        The raw loop runs in this process on the same device; its weights are dropped
        before each tether run, so the two never share the GPU's memory.
        """
        sys.path.insert(0, str(REPO))
        from bench.raw_decode import RawLoop

        a = self.args
        tokens = a.compare_tokens
        args = {"prompt": PROMPT, "model": a.model, "max_tokens": tokens, "device": a.device}
        raw: list[float] = []
        ours: list[float] = []
        engine: list[float] = []
        for pair in range(3):  # the first pair warms both sides up and is not counted
            loop = RawLoop(checkpoint, PROMPT, a.device)
            raw_tps = loop.tokens_per_second(tokens)
            loop.close()
            del loop
            done = self.run_to_end("llm.generate", args, 240)
            end_ms = done["client"]["submit_to_end_ms"]
            result = self.result(done["name"])
            if pair and end_ms:
                raw.append(raw_tps)
                ours.append(tokens / (end_ms / 1000.0))
                engine.append(float(result.get("timings", {}).get("tokens_per_second", 0.0)))
            self.log(f"[a'] pair {pair}: raw {raw_tps:.1f} tok/s, tether "
                     f"{tokens / (end_ms / 1000.0) if end_ms else float('nan'):.1f} tok/s")  # fmt: skip
        ratios = sorted(t / r for t, r in zip(ours, raw, strict=True))
        return {
            "tokens": tokens,
            "raw_tokens_per_second": raw,
            "tether_tokens_per_second": ours,
            "engine_reported_tokens_per_second": engine,
            "ratio_median": ratios[len(ratios) // 2] if ratios else None,
            "completed": bool(ratios),
        }

    def result(self, name: str) -> dict[str, Any]:
        task = self.get(name)
        value = json_format.MessageToDict(task.result) if task.HasField("result") else {}
        return value if isinstance(value, dict) else {}

    # ---------------------------------------------------------------- (a) generate
    def scenario_generate(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"model": a.model, "max_tokens": a.tokens,
                               "interrupt_after_tokens": a.interrupt_after}  # fmt: skip
        self.log(f"[a] warm-up: {a.model} on {a.device}, 8 tokens (loads the model)")
        out["warmup"] = self.run_to_end("llm.generate", self.generate_args(8, a.seed), 240)
        self.log(f"    {one_line(out['warmup'])}")
        out["idle_after_warmup"] = self.wait_idle_engines(90)
        out["engines_before"] = self.engine_table()

        attempts = []
        for attempt in range(3):  # a seeded draw may stop (EOS) before N tokens: next seed
            seed = a.seed + attempt
            record = self._interrupt_generate(seed)
            attempts.append(record)
            if record.get("interrupted_while_running"):
                break
            self.log("    the generation ended before the interrupt; trying the next seed")
            self.wait_idle_engines(60)
        out["attempts"] = len(attempts)
        out.update(attempts[-1])

        # The next task: does it start at once, and where?
        self.log("[a] next task: a short llm.generate (16 tokens)")
        prev_engine = out.get("task", {}).get("engine_id")
        nxt = self.run_to_end("llm.generate", self.generate_args(16, a.seed), 180)
        nxt["same_engine_as_interrupted"] = (
            nxt.get("engine_id") == prev_engine if prev_engine is not None else None
        )
        queued = nxt["client"]["submit_to_running_ms"]
        nxt["started_at_once"] = queued is not None and queued < 1000.0
        out["next_task"] = nxt
        if self.gpu:
            out["gpu_after_next_task"] = gpu_sample(self._pid_or_none(nxt.get("engine_id")))
        self.log(f"    {one_line(nxt)}")
        out["completed"] = bool(
            out.get("interrupted_while_running") and out.get("time_to_interrupted_ms") is not None
            and nxt["state"] == "SUCCEEDED"
        )  # fmt: skip
        return out

    def _pid_or_none(self, engine_id: int | None) -> int | None:
        return None if engine_id is None else self.engine_pid(engine_id)

    def _interrupt_generate(self, seed: int) -> dict[str, Any]:
        a = self.args
        rec: dict[str, Any] = {"seed": seed}
        idle = [e for e in self.engines() if e.state == cpb.ENGINE_STATE_IDLE]
        if self.gpu:
            rec["gpu_before"] = gpu_sample(idle[0].pid if len(idle) == 1 else None)
        self.log(
            f"[a] generate {a.tokens} tokens (seed {seed}); interrupt after {a.interrupt_after}"
        )
        t_submit = now()
        name = self.submit("llm.generate", self.generate_args(a.tokens, seed))
        w = self.watch(name, 400)
        try:
            got = w.wait_for(
                lambda: w.tokens >= a.interrupt_after or w.terminal_at is not None,
                self.budget.cap(240),
            )
            t_enough = now()
            rec["tokens_seen_before_interrupt"] = w.tokens
            running_at = w.state_times.get("RUNNING")
            rec["submit_to_running_ms"] = ms(running_at - t_submit) if running_at else None
            if running_at and w.output_after:
                first = w.output_after[0]
                rec["first_token_after_running_ms"] = ms(first - running_at)
                n = len(w.output_after)
                if n > 10:
                    rec["stream_ms_per_token"] = round(
                        (w.output_after[-1] - w.output_after[9]) * 1000 / (n - 10), 3
                    )
            snap = w.task
            engine_id = snap.engine_id if snap is not None and snap.HasField("engine_id") else None
            pid = self._pid_or_none(engine_id)
            rec["engine_id"], rec["engine_pid"] = engine_id, pid
            if self.gpu:
                rec["gpu_during"] = gpu_sample(pid)
            if not got or w.terminal_at is not None:
                rec["interrupted_while_running"] = False
                rec["note"] = (
                    "the task ended before the interrupt" if w.terminal_at is not None
                    else f"only {w.tokens} tokens within the wait"
                )  # fmt: skip
                if not w.terminal_at:
                    with contextlib.suppress(grpc.RpcError):
                        self.tasks.InterruptTask(tpb.InterruptTaskRequest(name=name), timeout=15)
                    w.wait_terminal(30)
                rec["task"] = task_summary(self.get(name))
                return rec
            rec["interrupted_while_running"] = True
            t0 = now()
            resp = self.tasks.InterruptTask(
                tpb.InterruptTaskRequest(name=name, reason="gpu_check: stop generation"),
                timeout=RPC_TIMEOUT_S,
            )
            t_ack = now()
            rec["interrupt_rpc_ms"] = ms(t_ack - t0)
            rec["interrupt_response_state"] = state_name(resp.task.state)
            rec["wait_before_interrupt_ms"] = ms(t0 - t_enough)
            w.wait_terminal(self.budget.cap(60))
            t_end = w.terminal_at
            rec["time_to_interrupted_ms"] = ms(t_end - t0) if t_end else None
            rec["terminal_state_on_stream"] = state_name(w.state)
            rec["tokens_after_interrupt_request"] = sum(1 for t in w.output_after if t > t0)
            rec["stage_seen_ms"] = {k: ms(v - t0) for k, v in w.stage_times.items()}
            if self.gpu:
                rec["gpu_after"] = gpu_sample(pid)
                time.sleep(0.5)
                rec["gpu_after_500ms"] = gpu_sample(pid)
            rec["task"] = task_summary(self.get(name))
            rec["engines_after"] = self.engine_table()
            rec["stream_error"] = w.error
        finally:
            w.close()
        self.log(f"    {one_line(rec['task'])}; InterruptTask -> INTERRUPTED "
                 f"{rec.get('time_to_interrupted_ms')} ms")  # fmt: skip
        return rec

    # ---------------------------------------------------------------- (b) stuck kernel
    def scenario_stuck(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"seconds": a.stuck_seconds,
                               "grace": {"sigint_s": a.stuck_grace, "sigterm_s": a.stuck_grace}}  # fmt: skip
        out["idle_before"] = self.wait_idle_engines(90)
        before = self.engines()
        old_ids = {e.id for e in before}
        out["engines_before"] = self.engine_table()
        self.log(f"[b] llm.stuck_cuda({a.stuck_seconds:g}) on {a.device}; "
                 f"interrupt with graces {a.stuck_grace}s/{a.stuck_grace}s")  # fmt: skip
        t_submit = now()
        name = self.submit("llm.stuck_cuda", {"seconds": a.stuck_seconds, "device": a.device})
        w = self.watch(name, 300)
        try:
            # The kernel starts right after the progress report "one GPU kernel ...".
            got = w.wait_for(
                lambda: "only SIGKILL" in w.progress_message or w.terminal_at is not None,
                self.budget.cap(180),
            )
            running_at = w.state_times.get("RUNNING")
            out["submit_to_running_ms"] = ms(running_at - t_submit) if running_at else None
            if not got or w.terminal_at is not None:
                out["note"] = (
                    "the stuck task never reported its kernel" if not got else "it ended on its own"
                )
                out["task"] = task_summary(self.get(name))
                out["completed"] = False
                return out
            time.sleep(0.5)  # let the kernel (or C call) be well under way
            snap = w.task
            engine_id = snap.engine_id if snap is not None and snap.HasField("engine_id") else None
            pid = self._pid_or_none(engine_id)
            out["engine_id"], out["engine_pid"] = engine_id, pid
            if self.gpu:
                out["gpu_during"] = gpu_sample(pid)
            grace = task_pb2.GracePeriods(
                sigint=duration(a.stuck_grace), sigterm=duration(a.stuck_grace)
            )
            t0 = now()
            resp = self.tasks.InterruptTask(
                tpb.InterruptTaskRequest(name=name, reason="gpu_check: stuck kernel", grace=grace),
                timeout=RPC_TIMEOUT_S,
            )
            out["interrupt_rpc_ms"] = ms(now() - t0)
            out["interrupt_response_state"] = state_name(resp.task.state)
            # Poll nvidia-smi and GetCluster while waiting for the end on the stream.
            release = self._watch_release_and_replacement(w, t0, pid, old_ids, out)
            out.update(release)
            t_end = w.terminal_at
            out["time_to_interrupted_ms"] = ms(t_end - t0) if t_end else None
            out["terminal_state_on_stream"] = state_name(w.state)
            out["stage_seen_ms"] = {k: ms(v - t0) for k, v in w.stage_times.items()}
            out["task"] = task_summary(self.get(name))
            out["stream_error"] = w.error
        finally:
            w.close()
        self.log(f"    {one_line(out['task'])}; InterruptTask -> {out['terminal_state_on_stream']} "
                 f"{out.get('time_to_interrupted_ms')} ms")  # fmt: skip

        self.log("[b] next task: a short llm.generate (16 tokens)")
        t_next = now()
        nxt = self.run_to_end("llm.generate", self.generate_args(16, a.seed), 180)
        out["next_task"] = nxt
        queued = nxt["client"]["submit_to_running_ms"]
        out["interrupt_to_next_running_ms"] = (
            ms(t_next - t0) + queued if queued is not None else None
        )
        nxt["on_replacement_engine"] = nxt.get("engine_id") not in old_ids
        out["engines_after"] = self.engine_table()
        self.log(f"    {one_line(nxt)}")
        out["completed"] = bool(
            out.get("time_to_interrupted_ms") is not None and nxt["state"] == "SUCCEEDED"
        )
        return out

    def _watch_release_and_replacement(
        self, w: TaskWatch, t0: float, pid: int | None, old_ids: set[int], out: dict[str, Any]
    ) -> dict[str, Any]:
        """Until INTERRUPTED, the GPU memory released and a new engine idle (or time is up)."""
        res: dict[str, Any] = {}
        during = out.get("gpu_during") or {}
        pid_listed = bool(during.get("engine_listed"))
        during_used = during.get("used_mib")
        released_at = registered_at = idle_at = None
        new_engine: dict[str, Any] | None = None
        pid_gone_at = None
        smi_samples: list[tuple[float | None, float | None]] = []
        deadline = now() + self.budget.cap(60)
        while now() < deadline:
            t = now()
            if pid is not None and pid_gone_at is None and not process_alive(pid):
                pid_gone_at = t
            if self.gpu and released_at is None:
                s = gpu_sample(pid)
                if s is not None:
                    smi_samples.append((ms(t - t0), s["used_mib"]))
                    if pid_listed:
                        if not s["engine_listed"]:
                            released_at = t
                    elif (
                        during_used is not None
                        and s["used_mib"] is not None
                        and s["used_mib"] <= during_used - self.args.release_mib
                    ):
                        released_at = t
            for e in self.engines():
                if e.id in old_ids:
                    continue
                if registered_at is None:
                    registered_at = t
                    new_engine = {"id": e.id, "pid": e.pid}
                elif new_engine is not None and new_engine["id"] == e.id and e.pid:
                    new_engine["pid"] = e.pid  # 0 until the engine finished its setup
                if idle_at is None and e.state == cpb.ENGINE_STATE_IDLE:
                    idle_at = t
            gpu_done = not self.gpu or released_at is not None
            if w.terminal_at is not None and gpu_done and idle_at is not None:
                break
            time.sleep(0.1)
        w.wait_terminal(self.budget.cap(10) if w.terminal_at is None else 0)
        res["engine_process_gone_ms"] = ms(pid_gone_at - t0) if pid_gone_at else None
        if self.gpu:
            res["gpu_release_rule"] = (
                "engine pid no longer in --query-compute-apps" if pid_listed
                else f"total used fell >= {self.args.release_mib} MiB below the sample during"
            )  # fmt: skip
            res["gpu_released_ms"] = ms(released_at - t0) if released_at else None
            res["gpu_samples_ms_used_mib"] = smi_samples[:80]
            res["gpu_after"] = gpu_sample(pid)
        res["replacement_engine"] = new_engine
        res["replacement_registered_ms"] = ms(registered_at - t0) if registered_at else None
        res["replacement_idle_ms"] = ms(idle_at - t0) if idle_at else None
        return res


# --------------------------------------------------------------------------- reporting
def ts_seconds(ts: Any) -> float | None:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else None


def task_summary(task: task_pb2.Task) -> dict[str, Any]:
    r = task.resources
    created, started, ended = (ts_seconds(task.create_time), ts_seconds(task.start_time),
                               ts_seconds(task.end_time))  # fmt: skip
    summary: dict[str, Any] = {
        "name": task.name,
        "task": task.task,
        "state": state_name(task.state),
        "engine_id": task.engine_id if task.HasField("engine_id") else None,
        "attempt": task.attempt,
        "final_stage": stage_name(task.interrupt.final_stage)
        if task.HasField("interrupt")
        else None,
        "output_chars": len(task.output),
        "server_queue_ms": ms(started - created) if created and started else None,
        "server_run_ms": ms(ended - started) if started and ended else None,
    }
    if task.HasField("error"):
        summary["error"] = {"reason": task.error.reason, "type": task.error.type,
                            "message": task.error.message[:500]}  # fmt: skip
    if task.HasField("resources"):
        summary["resources"] = {
            "rss_before_mib": mib(r.rss_before_bytes),
            "rss_after_mib": mib(r.rss_after_bytes),
            "gpu_allocated_before_mib": mib(r.gpu_allocated_before_bytes),
            "gpu_allocated_after_mib": mib(r.gpu_allocated_after_bytes),
            "gpu_reserved_after_mib": mib(r.gpu_reserved_after_bytes),
            "gpu_growth_mib": mib(r.gpu_allocated_after_bytes - r.gpu_allocated_before_bytes),
            "rss_growth_mib": mib(r.rss_after_bytes - r.rss_before_bytes),
            "leftover_children": r.leftover_children,
            "reclaimed": r.reclaimed,
            "engine_recycled": r.engine_recycled,
            "summary": r.summary,
        }
    if task.HasField("result"):
        result = json.loads(_value_json(task.result))
        if isinstance(result, dict):
            result.pop("text", None)
        summary["result"] = result
    return summary


def _value_json(value: struct_pb2.Value) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(value)


def one_line(t: dict[str, Any]) -> str:
    r = t.get("resources") or {}
    parts = [f"{t.get('name')} {t.get('state')} on engine {t.get('engine_id')}"]
    if t.get("final_stage") and t["final_stage"] != "UNSPECIFIED":
        parts.append(f"stage {t['final_stage']}")
    if r:
        parts.append(f"reclaimed={r.get('reclaimed')} recycled={r.get('engine_recycled')}")
    client = t.get("client") or {}
    if client.get("submit_to_running_ms") is not None:
        parts.append(f"submit->RUNNING {client['submit_to_running_ms']} ms")
    if t.get("error") and t["state"] not in ("INTERRUPTED",):
        parts.append(f"error {t['error']}")
    return ", ".join(parts)


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def gpu_line(sample: dict[str, Any] | None) -> str:
    if not sample:
        return "n/a"
    engine = (
        f"engine pid {sample['engine_pid']}: {fmt(sample['engine_mib'], ' MiB')}"
        if sample.get("engine_pid") else "engine pid unknown"
    )  # fmt: skip
    return f"GPU used {fmt(sample.get('used_mib'), ' MiB')} ({engine})"


def report(results: dict[str, Any]) -> str:
    lines = ["", "=" * 78, "tether GPU check", "=" * 78]
    env = results.get("environment", {})
    lines.append(f"device {results.get('device')}, model {results.get('model')}, "
                 f"python {env.get('python')}, torch {env.get('torch')}, "
                 f"grpcio {env.get('grpcio')}, protobuf {env.get('protobuf')}")  # fmt: skip
    if env.get("gpu"):
        g = env["gpu"]["gpus"][0]
        lines.append(
            f"GPU: {g['name']}, {fmt(g['memory_total_mib'], ' MiB')}, driver {g['driver']}"
        )
    srv = results.get("server") or {}
    lines.append(f"server ready (SERVING) in {fmt(srv.get('start_ms'), ' ms')} with "
                 f"{srv.get('engines')} engine(s)")  # fmt: skip

    a = results.get("generate_interrupt")
    lines.append("")
    lines.append("(a) interrupt llm.generate")
    if a:
        w = a.get("warmup") or {}
        wr = w.get("resources") or {}
        lines.append(f"  warm-up: {one_line(w)}")
        if wr:
            lines.append(f"    resources: {wr.get('summary')}")
        t = a.get("task") or {}
        r = t.get("resources") or {}
        lines.append(f"  interrupted after {a.get('tokens_seen_before_interrupt')} streamed tokens "
                     f"(stream {fmt(a.get('stream_ms_per_token'), ' ms/token')}), "
                     f"engine {a.get('engine_id')} pid {a.get('engine_pid')}")  # fmt: skip
        lines.append(f"  InterruptTask -> INTERRUPTED on the stream: "
                     f"{fmt(a.get('time_to_interrupted_ms'), ' ms')} "
                     f"(rpc {fmt(a.get('interrupt_rpc_ms'), ' ms')}; "
                     f"{a.get('tokens_after_interrupt_request')} tokens after the request)")  # fmt: skip
        lines.append(f"  state {t.get('state')}, final_stage {t.get('final_stage')}")
        lines.append(f"  ResourceReport: gpu allocated {fmt(r.get('gpu_allocated_before_mib'), ' MiB')}"
                     f" -> {fmt(r.get('gpu_allocated_after_mib'), ' MiB')}, reserved after "
                     f"{fmt(r.get('gpu_reserved_after_mib'), ' MiB')}, rss "
                     f"{fmt(r.get('rss_before_mib'), ' MiB')} -> {fmt(r.get('rss_after_mib'), ' MiB')}, "
                     f"reclaimed={r.get('reclaimed')}, engine_recycled={r.get('engine_recycled')}")  # fmt: skip
        if r.get("summary"):
            lines.append(f"    {r['summary']}")
        if wr and r:
            lines.append(f"  growth over the task: gpu {fmt(r.get('gpu_growth_mib'), ' MiB')} "
                         f"(warm-up {fmt(wr.get('gpu_growth_mib'), ' MiB')}), rss "
                         f"{fmt(r.get('rss_growth_mib'), ' MiB')} (warm-up "
                         f"{fmt(wr.get('rss_growth_mib'), ' MiB')}); a fresh engine's first task "
                         f"counts the model it loads")  # fmt: skip
        for key in (
            "gpu_before",
            "gpu_during",
            "gpu_after",
            "gpu_after_500ms",
            "gpu_after_next_task",
        ):
            if key in a:
                lines.append(f"  nvidia-smi {key.removeprefix('gpu_'):>15}: {gpu_line(a[key])}")
        n = a.get("next_task") or {}
        lines.append(f"  next task: {one_line(n)}; started at once: {n.get('started_at_once')}, "
                     f"same engine: {n.get('same_engine_as_interrupted')}")  # fmt: skip
        if a.get("note"):
            lines.append(f"  NOTE: {a['note']}")
    else:
        lines.append("  not run")

    b = results.get("stuck_kernel")
    lines.append("")
    lines.append("(b) interrupt llm.stuck_cuda (needs SIGKILL)")
    if b:
        t = b.get("task") or {}
        lines.append(f"  engine {b.get('engine_id')} pid {b.get('engine_pid')}; graces "
                     f"{b['grace']['sigint_s']}s / {b['grace']['sigterm_s']}s")  # fmt: skip
        lines.append(f"  InterruptTask -> {b.get('terminal_state_on_stream')} on the stream: "
                     f"{fmt(b.get('time_to_interrupted_ms'), ' ms')}; stages seen at "
                     f"{b.get('stage_seen_ms')} ms")  # fmt: skip
        lines.append(f"  state {t.get('state')}, final_stage {t.get('final_stage')}, "
                     f"error {(t.get('error') or {}).get('reason')}")  # fmt: skip
        lines.append(
            f"  engine process gone: {fmt(b.get('engine_process_gone_ms'), ' ms')} after the request"
        )
        if "gpu_released_ms" in b:
            lines.append(f"  GPU memory released: {fmt(b.get('gpu_released_ms'), ' ms')} "
                         f"({b.get('gpu_release_rule')})")  # fmt: skip
            lines.append(f"  nvidia-smi during: {gpu_line(b.get('gpu_during'))}")
            lines.append(f"  nvidia-smi after:  {gpu_line(b.get('gpu_after'))}")
        lines.append(f"  replacement engine {b.get('replacement_engine')}: registered "
                     f"{fmt(b.get('replacement_registered_ms'), ' ms')}, idle "
                     f"{fmt(b.get('replacement_idle_ms'), ' ms')} after the request")  # fmt: skip
        n = b.get("next_task") or {}
        lines.append(f"  next task: {one_line(n)}; on the replacement: "
                     f"{n.get('on_replacement_engine')}; RUNNING "
                     f"{fmt(b.get('interrupt_to_next_running_ms'), ' ms')} after the request")  # fmt: skip
        if b.get("note"):
            lines.append(f"  NOTE: {b['note']}")
    else:
        lines.append("  not run")

    compare = results.get("raw_vs_tether")
    if compare:
        lines.append("")
        lines.append("(a') llm.generate tokens/s against a raw transformers loop (same device)")
        lines.append(f"  raw {compare['raw_tokens_per_second']} tok/s; tether (submit -> end) "
                     f"{compare['tether_tokens_per_second']}; engine-reported "
                     f"{compare['engine_reported_tokens_per_second']}")  # fmt: skip
        lines.append(f"  median ratio {compare['ratio_median']} ({compare['tokens']} tokens a run)")
    lines.append("")
    done = results.get("completed", {})
    lines.append(f"completed: generate_interrupt={done.get('generate_interrupt')}, "
                 f"stuck_kernel={done.get('stuck_kernel')}; total {fmt(results.get('elapsed_s'), ' s')}")  # fmt: skip
    for err in results.get("errors", []):
        lines.append(f"ERROR: {err.splitlines()[-1] if err else err}")
    lines.append("=" * 78)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="cuda, cpu, or auto (cuda when nvidia-smi sees a GPU)",
    )
    p.add_argument(
        "--model", default=None, help="model of llm.generate (default: large on cuda, tiny on cpu)"
    )
    p.add_argument(
        "--hf-shape",
        choices=["test", "1b"],
        default=None,
        help="build a random-weight Llama checkpoint of this shape (1b: ~0.76 B parameters, "
        "bf16 on cuda), serve it with --model hf=DIR, run (a) on it and compare tokens/s "
        "with a raw transformers decode loop (needs transformers, tokenizers, safetensors)",
    )
    p.add_argument(
        "--compare-tokens", type=int, default=256, help="tokens of each --hf-shape comparison run"
    )
    p.add_argument("--tokens", type=int, default=2000, help="max_tokens of the long generation")
    p.add_argument(
        "--interrupt-after", type=int, default=200, help="streamed tokens before the interrupt"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=32)
    p.add_argument(
        "--engines", type=int, default=1, help="engines of the embedded cluster (1 or 2)"
    )
    p.add_argument("--stuck-seconds", type=float, default=60.0)
    p.add_argument(
        "--stuck-grace", type=float, default=0.5, help="SIGINT and SIGTERM grace for (b)"
    )
    p.add_argument(
        "--release-mib",
        type=float,
        default=256.0,
        help="drop of total GPU memory that counts as released when nvidia-smi lists no pids",
    )
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--only", choices=["generate", "stuck"], default=None, help="run one scenario")
    p.add_argument(
        "--print-device-command",
        action="store_true",
        help="print the command line (and carry list) for the GPU machine and exit",
    )
    args = p.parse_args(argv)  # fmt: skip
    if args.device == "auto":
        info = gpu_info()
        args.device = "cuda" if info and info["gpus"] else "cpu"
    if args.hf_shape:
        args.model = "hf"
    if args.model is None:
        args.model = "large" if args.device == "cuda" else "tiny"
    if not 1 <= args.interrupt_after < args.tokens:
        p.error("--interrupt-after must be in [1, --tokens)")
    return args


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": version_of("torch"),
        "grpcio": version_of("grpcio"),
        "protobuf": version_of("protobuf"),
        "ipyparallel": version_of("ipyparallel"),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "gpu": gpu_info() if args.device == "cuda" else None,
    }


def build_hf_checkpoint(work: Path, args: argparse.Namespace) -> Path:
    """A random-weight Llama of ``--hf-shape`` (bf16 on disk for CUDA) in the work dir."""
    from tether_server.tasks.hf_random import SHAPES, build_checkpoint

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    started = now()
    path = build_checkpoint(
        work / "hf", style="metaspace", shape=SHAPES[args.hf_shape], seed=args.seed, dtype=dtype
    )
    print(f"gpu_check: built the {args.hf_shape} checkpoint ({dtype}) in {now() - started:.1f}s",
          flush=True)  # fmt: skip
    return path


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_device_command:
        print(DEVICE_COMMAND)
        print(f"carry: {json.dumps(DEVICE_CARRY)}")
        return 0
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # `timeout` -> finally still runs
    started = now()
    results: dict[str, Any] = {
        "device": args.device,
        "model": args.model,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args),
        "errors": [],
        "completed": {"generate_interrupt": False, "stuck_kernel": False},
    }
    if args.device == "cuda" and not nvidia_smi_available():
        results["errors"].append("--device cuda but no nvidia-smi on PATH")
    budget = Budget(args.budget)
    work = Path(tempfile.mkdtemp(prefix="tether-gpu-check-"))
    checkpoint: Path | None = None
    extra: list[str] = []
    if args.hf_shape:
        checkpoint = build_hf_checkpoint(work, args)
        extra = ["--model", f"hf={checkpoint}"]
    server = Server(work, args.engines, grace=(2.0, 2.0, 5.0), extra_args=extra)
    print(f"gpu_check: device {args.device}, model {args.model}, server {server.address}, "
          f"work dir {work}", flush=True)  # fmt: skip
    try:
        start_s = server.start(budget.cap(120))
        results["server"] = {"address": server.address, "engines": args.engines,
                             "start_ms": ms(start_s)}  # fmt: skip
        check = Check(args, server, budget)
        results["server"]["engines_at_start"] = check.engine_table()
        print(f"gpu_check: server SERVING after {start_s:.1f}s", flush=True)
        scenarios: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
            ("generate_interrupt", check.scenario_generate, "generate"),
            ("stuck_kernel", check.scenario_stuck, "stuck"),
        ]
        if checkpoint is not None:
            scenarios.insert(
                1, ("raw_vs_tether", lambda: check.scenario_compare(checkpoint), "generate")
            )
        for key, run, flag in scenarios:
            if args.only and args.only != flag:
                continue
            try:
                results[key] = run()
                if key in results["completed"]:
                    results["completed"][key] = bool(results[key].get("completed"))
            except (Exception, KeyboardInterrupt) as exc:
                results["errors"].append(f"{key}: {''.join(traceback.format_exception(exc))}")
                print(f"gpu_check: {key} failed: {exc!r}", flush=True)
                if isinstance(exc, KeyboardInterrupt):
                    break
        check.channel.close()
    except (Exception, KeyboardInterrupt) as exc:
        results["errors"].append("".join(traceback.format_exception(exc)))
        print(f"gpu_check: failed: {exc!r}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            results.setdefault("server", {})["exit_code"] = server.stop()
        results["elapsed_s"] = round(now() - started, 1)
        log_text = server.log_tail(200_000)
        results["server_log_tail"] = log_text[-3000:]
        print(report(results), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
            args.out.with_suffix(".server.log").write_text(log_text)
            print(f"gpu_check: wrote {args.out}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    ok = all(results["completed"].get(k) for k in (["generate_interrupt", "stuck_kernel"]
                                                   if not args.only else
                                                   [{"generate": "generate_interrupt",
                                                     "stuck": "stuck_kernel"}[args.only]]))  # fmt: skip
    return 0 if ok and not results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
