"""The test hosts themselves: reachable over ssh, namespaced pids, and nothing left after."""

from __future__ import annotations

import subprocess

from .netns import TestHost, namespaced_hosts


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_hosts_have_their_own_pids_and_leave_nothing_behind() -> None:
    made: list[TestHost] = []
    with namespaced_hosts(["x1", "x2"]) as hosts:
        made = hosts
        for host in hosts:
            done = host.run("echo $$")
            assert done.returncode == 0, done.stderr
            # A fresh PID namespace: the login shell's pid is small, and sshd is its PID 1.
            assert int(done.stdout) < 5000
            assert "/usr/sbin/sshd" in host.run("cat /proc/1/cmdline").stdout
            # Its traffic to the first host's root-side address (where the controller
            # listens) takes its default route back to the root namespace.
            route = host.run(f"ip route get {hosts[0].root_address}").stdout
            assert f"via {host.root_address}" in route or hosts[0] is host
        pids = [pid for host in hosts for pid in host.pids()]
        assert pids
    names = _netns_names()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for host in made:
        assert host.netns not in names
        assert host.veth_root not in links
    for pid in pids:
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_hosts_are_removed_when_the_test_fails() -> None:
    made: list[TestHost] = []
    try:
        with namespaced_hosts(["y1"]) as hosts:
            made = hosts
            raise RuntimeError("a failing test")
    except RuntimeError:
        pass
    assert made and made[0].netns not in _netns_names()
