"""Shared test support: run a real tether-server on a free loopback port.

The server runs as a subprocess (the same console script users run), with its
own data directory, and is always stopped by PID. ``leftover_processes`` reads
the process table so tests can prove a shutdown left nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
SERVER_BIN = Path(sys.executable).parent / "tether-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_channel(address: str, root_cert: bytes | None = None) -> grpc.Channel:
    """A channel to a test server: plaintext, or TLS trusting ``root_cert``."""
    if root_cert is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root_cert))


def wait_serving(address: str, timeout: float = 90.0, root_cert: bytes | None = None) -> None:
    """Block until grpc.health.v1 says SERVING (the cluster has at least one engine)."""
    deadline = time.monotonic() + timeout
    last: object = None
    with open_channel(address, root_cert) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = resp.status
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} not SERVING after {timeout}s (last: {last})")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def ipyparallel_processes_of(data_dir: Path) -> list[psutil.Process]:
    """ipyparallel processes (controller, engines, nannies) started for this data dir."""
    found = []
    marker = str(data_dir)
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "ipyparallel" in cmd and marker in cmd:
                found.append(proc)
    return found


class ServerProcess:
    """A tether-server subprocess. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        engines: int = 2,
        extra_args: list[str] | None = None,
        root_cert: bytes | None = None,
    ) -> None:
        self.root_cert = root_cert
        self.data_dir = data_dir
        self.port = port or free_port()
        self.engines = engines
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.children: list[psutil.Process] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(SERVER_BIN),
            "--listen",
            self.address,
            "--engines",
            str(self.engines),
            "--data-dir",
            str(self.data_dir),
            *self.extra_args,
        ]
        log = open(self.log_path, "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True
        )
        try:
            wait_serving(self.address, timeout, self.root_cert)
        except BaseException:
            self.kill()
            raise
        self.children = descendants(self.proc.pid)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        self.children = descendants(proc.pid) or self.children
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._reap_children()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the server alone (a crash); its cluster is left for the next start to clean."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        self.children = descendants(proc.pid) or self.children
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)

    def kill_leftovers(self) -> None:
        self._reap_children()

    def _reap_children(self) -> None:
        for child in self.children + ipyparallel_processes_of(self.data_dir):
            with contextlib.suppress(psutil.Error):
                if child.is_running():
                    child.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill_leftovers()


@contextlib.contextmanager
def running_server(data_dir: Path, **kwargs: object) -> Iterator[ServerProcess]:
    server = ServerProcess(data_dir, **kwargs)  # type: ignore[arg-type]
    with server:
        yield server


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Polls ``predicate`` until it returns something true, and returns that; fails after
    ``timeout`` seconds (a bound against hangs, never a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


FAST_GRACE = ["--grace-sigint", "0.5s", "--grace-sigterm", "0.5s", "--grace-sigkill", "5s"]
"""Short graces, so tests of the interrupt ladder run quickly."""

FAST_SERVER_ARGS = [*FAST_GRACE, "--checkpoint-interval", "0.5s"]
"""Short graces and checkpoints, so tests of the ladder and of idle streams run quickly."""


def serve_for_tests(
    tmp_path_factory: Any, name: str, *, engines: int = 2, extra_args: list[str] | None = None
) -> Iterator[ServerProcess]:
    """A fixture body: a server with FAST_SERVER_ARGS in its own data dir, stopped after."""
    data = tmp_path_factory.mktemp(name) / "data"
    with ServerProcess(
        data, engines=engines, extra_args=[*FAST_SERVER_ARGS, *(extra_args or [])]
    ) as proc:
        yield proc
