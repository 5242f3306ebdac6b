"""Extra "hosts" on this machine for the multi-host tests: namespaces with a real sshd.

Each :class:`TestHost` is a Linux network namespace joined to the root namespace by a
veth pair, with addresses of its own (a /24 per host, from ``10.203.0.0/16``, a range
only these tests use), ``lo`` up and a default route back through the root side, and a
real OpenSSH server (Debian's ``openssh-server``) started inside it *and* inside a fresh
PID namespace (``unshare --pid --fork --mount-proc``). Everything the sshd spawns (the
engines, their nannies, tether's watchdogs) therefore has pids that mean nothing on the
server's side, as on a real remote machine. Facts measured: shared/notes/hosts.md.

What makes teardown complete: sshd is PID 1 of its PID namespace, so killing it makes the
kernel kill every process of that namespace; then the veth pair and the namespace go.
:func:`reap_stale` removes what a killed test run left behind (the owner's pid is in
every name, so only dead runs' leftovers are touched).

Needs root (CI runs as root). ``scripts/ensure_sshd.sh`` installs the packages.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
PREFIX = "tth"
"""Namespace and link names start with this, then the owning process's pid."""
SUBNET_BASE = "10.203"
"""Each host gets ``10.203.N.0/24``: .1 on the root side, .2 inside the namespace."""
LOCK = Path("/run/tether-test-hosts.lock")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _used_subnets() -> set[int]:
    out = _ip("-4", "-o", "addr", "show").stdout
    return {int(m) for m in re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", out)}


@dataclass
class TestHost:
    """One namespaced host with its sshd; :meth:`start` makes it, :meth:`stop` removes it."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    label: str
    """Short name, used in tether's host specs (``h2``)."""
    index: int
    """The N of 10.203.N.0/24."""
    workdir: Path
    client_key: Path
    owner: int = field(default_factory=os.getpid)
    port: int = 22
    sshd: subprocess.Popen[bytes] | None = None
    path_prefix: str = ""
    """A directory put first on PATH of every ssh session (e.g. a fake ``nvidia-smi``)."""

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.owner}{self.label}"

    @property
    def veth_root(self) -> str:
        return f"{PREFIX}{self.owner}{self.label}r"[:15]

    @property
    def veth_inner(self) -> str:
        return f"{PREFIX}{self.owner}{self.label}i"[:15]

    @property
    def root_address(self) -> str:
        """The root namespace's end of the link (engines reach the controller here)."""
        return f"{SUBNET_BASE}.{self.index}.1"

    @property
    def address(self) -> str:
        """The host's own address (its sshd listens here)."""
        return f"{SUBNET_BASE}.{self.index}.2"

    @property
    def location(self) -> str:
        """``user@address:port`` as ipyparallel's SSH launcher takes it."""
        return f"root@{self.address}:{self.port}"

    # ------------------------------------------------------------------ network
    def start(self) -> TestHost:
        try:
            self._make_network()
            self._start_sshd()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_network(self) -> None:
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth_root, "type", "veth", "peer", "name", self.veth_inner)
        _ip("link", "set", self.veth_inner, "netns", self.netns)
        _ip("addr", "add", f"{self.root_address}/24", "dev", self.veth_root)
        _ip("link", "set", self.veth_root, "up")
        inside = ("netns", "exec", self.netns, "ip")
        _ip(*inside, "addr", "add", f"{self.address}/24", "dev", self.veth_inner)
        _ip(*inside, "link", "set", self.veth_inner, "up")
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "route", "add", "default", "via", self.root_address)

    def set_link(self, up: bool) -> None:
        """Take the host off the network (or back on): its link, seen from the root side."""
        _ip("link", "set", self.veth_root, "up" if up else "down")

    # ------------------------------------------------------------------ sshd
    def _start_sshd(self) -> None:
        d = self.workdir / self.label
        d.mkdir(parents=True, exist_ok=True)
        host_key = d / "host_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
            check=True,
            timeout=30,
        )
        authorized = d / "authorized_keys"
        shutil.copy(self.client_key.with_suffix(".pub"), authorized)
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.address}:{self.port}",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {d / 'sshd.pid'}",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "MaxStartups 100:30:200",
                    "MaxSessions 100",
                    # The launcher's scp speaks sftp: without this it fails with
                    # "subsystem request failed" and no engine starts.
                    "Subsystem sftp internal-sftp",
                    *(
                        [f"SetEnv PATH={self.path_prefix}:/usr/local/bin:/usr/bin:/bin"]
                        if self.path_prefix
                        else []
                    ),
                    "",
                ]
            )
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        log = open(d / "sshd.log", "ab")  # noqa: SIM115 - closed with the process
        self.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                SSHD,
                "-D",
                "-e",
                "-f",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ssh()

    def ssh_args(self) -> list[str]:
        """Options of every ssh and scp call to this host (key, no host-key prompts)."""
        return ssh_options(self.client_key)

    def run(self, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host over ssh."""
        return subprocess.run(
            ["ssh", *self.ssh_args(), "-p", str(self.port), f"root@{self.address}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _wait_ssh(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.sshd is not None and self.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {self.label} exited: {self.sshd.returncode}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                done = self.run("true", timeout=5)
                if done.returncode == 0:
                    return
                last = done.stderr
            time.sleep(0.1)
        raise TimeoutError(f"sshd of {self.label} not answering: {last}")

    def pids(self) -> list[int]:
        """Processes in the host's network namespace (its sshd and all it started)."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def processes(self, pattern: str) -> list[psutil.Process]:
        """The host's processes whose command line contains ``pattern``."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if pattern in " ".join(proc.cmdline()):
                    found.append(proc)
        return found

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Kill sshd (and so its whole PID namespace), remove the link and the namespace."""
        if self.sshd is not None:
            # sshd first (PID 1 of its namespace: the kernel kills the rest), so that
            # unshare reaps it; then unshare itself and anything left in its group.
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.sshd.pid).children():
                    child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.sshd.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(10)
            self.sshd = None
        _remove_namespace(self.netns, self.veth_root)


def ssh_options(key: Path) -> list[str]:
    return [
        "-i",
        str(key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
    ]


def _remove_namespace(netns: str, veth_root: str) -> None:
    # Whatever still runs in the namespace (nothing, once its PID 1 died) goes first.
    out = _ip("netns", "pids", netns, check=False).stdout
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _ip("netns", "pids", netns, check=False).stdout.split() and time.monotonic() < deadline:
        time.sleep(0.05)
    _ip("link", "del", veth_root, check=False)
    _ip("netns", "del", netns, check=False)


def reap_stale() -> None:
    """Remove namespaces and links of earlier test runs whose process is gone."""
    names = _ip("netns", "list", check=False).stdout.split()
    links = re.findall(rf"\d+: ({PREFIX}\d+\w*?)[@:]", _ip("-o", "link", "show").stdout)
    for name in [n for n in names if n.startswith(PREFIX)] + links:
        match = re.match(rf"{PREFIX}(\d+)", name)
        if match and not psutil.pid_exists(int(match.group(1))):
            if name in names:
                _remove_namespace(name, "")
            else:
                _ip("link", "del", name, check=False)


FAKE_NVIDIA_SMI = r"""#!/bin/sh
# A stand-in for nvidia-smi on a test host: GPUS GPUs of 80 GiB, 1 GiB used on each.
gpus=${FAKE_GPUS:-%d}
want=""
prev=""
for arg in "$@"; do
  [ "$prev" = "-i" ] && want="$arg"
  prev="$arg"
done
case "$*" in
  *memory.used*) fields=used ;;
  *) fields=total ;;
esac
i=0
while [ $i -lt $gpus ]; do
  if [ -z "$want" ] || echo ",$want," | grep -q ",$i,"; then
    if [ $fields = used ]; then echo "$i, 1024, 81920"; else echo "$i, 81920"; fi
  fi
  i=$((i+1))
done
"""


def fake_nvidia_smi(directory: Path, gpus: int) -> Path:
    """Write a fake ``nvidia-smi`` listing ``gpus`` GPUs into ``directory``; the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(FAKE_NVIDIA_SMI % gpus)
    script.chmod(0o755)
    return directory


@contextlib.contextmanager
def namespaced_hosts(
    labels: list[str], path_prefix: dict[str, str] | None = None
) -> Iterator[list[TestHost]]:
    """Start one namespaced host per label; all are removed on exit, whatever happened.

    ``path_prefix``: per label, a directory first on the PATH of that host's ssh sessions.
    """
    if os.geteuid() != 0:
        raise RuntimeError("the multi-host tests need root (network namespaces)")
    subprocess.run(["scripts/ensure_sshd.sh"], check=True, cwd=Path(__file__).parents[2])
    workdir = Path(tempfile.mkdtemp(prefix="tether-hosts-"))
    key = workdir / "client_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    hosts: list[TestHost] = []
    try:
        LOCK.touch(exist_ok=True)
        with open(LOCK) as lock:  # one run at a time picks subnets
            fcntl.flock(lock, fcntl.LOCK_EX)
            reap_stale()
            used = _used_subnets()
            free = (n for n in range(10, 250) if n not in used)
            for label in labels:
                host = TestHost(label, next(free), workdir, key)
                host.path_prefix = (path_prefix or {}).get(label, "")
                hosts.append(host)
                host._make_network()
        for host in hosts:
            host._start_sshd()
        yield hosts
    finally:
        for host in hosts:
            with contextlib.suppress(Exception):
                host.stop()
        shutil.rmtree(workdir, ignore_errors=True)
