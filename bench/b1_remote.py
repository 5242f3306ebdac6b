"""B1 against a remote engine: interrupt latency through tether beside raw ``send_signal``.

``python -m bench.b1_remote [--pairs N]`` (root: it makes a namespaced host with a real
sshd, tests/hosts/netns.py, and removes it after). One tether server with one engine on
that host (placed by ipyparallel's SSH launcher), then, alternating on the *same* engine:

- tether: ``InterruptTask`` on ``demo.sleep(60)`` 0.2 s after RUNNING -> INTERRUPTED seen
  by ``GetTask`` polling every 2 ms (the stream's cost is measured by B1 itself);
- raw: a second ipyparallel ``Client`` of tether's hub applies ``remote_sleep`` (one
  ``time.sleep(60)`` under Python's own SIGINT handler, since tether's guard ignores a
  SIGINT it was not armed for) and ``send_signal(SIGINT)``s it 0.2 s after it started ->
  ``AsyncResult`` done.

Both paths go client -> hub -> the engine's nanny on the other host -> the engine. Not
part of ``make bench`` (it needs root and sshd).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import ipyparallel as ipp

from tests.hosts.netns import namespaced_hosts
from tests.hosts.test_remote_engines import server_args
from tests.integration.helpers import running_server_with_env, submit, wait_state
from tests.support import FAST_SERVER_ARGS
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

SETTLE_S = 0.2


def remote_sleep(seconds: float) -> float:
    """``time.sleep`` with Python's default SIGINT handler (tether's guard put back after)."""
    import signal as _signal
    import time as _time

    previous = _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    try:
        _time.sleep(seconds)
    finally:
        _signal.signal(_signal.SIGINT, previous)
    return seconds


def _tether_once(tasks: task_service_pb2_grpc.TaskServiceStub) -> float:
    task = submit(tasks, "demo.sleep", args={"seconds": 60})
    wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name), timeout=10)
    while True:
        got = tasks.GetTask(spb.GetTaskRequest(name=task.name, view=tpb.TASK_VIEW_BASIC))
        if got.task.state == tpb.TASK_STATE_INTERRUPTED:
            return (time.perf_counter() - t0) * 1000
        if got.task.state not in (tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_INTERRUPTING):
            raise RuntimeError(f"tether task ended {got.task.state}")
        time.sleep(0.002)


def _raw_once(client: ipp.Client, engine: int) -> float:
    ar = client[engine].apply_async(remote_sleep, 60.0)
    deadline = time.monotonic() + 30
    while client.metadata.get(ar.msg_ids[0], {}).get("engine_id") is None:
        if time.monotonic() > deadline:
            raise TimeoutError("raw task never started")
        time.sleep(0.002)
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    client.send_signal(signal.SIGINT, targets=[engine], block=False)
    ar.wait(30)
    if not ar.ready() or ar.successful():
        raise RuntimeError("the raw SIGINT did not end the task")
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.b1_remote")
    parser.add_argument("--pairs", type=int, default=20)
    a = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="b1-remote-"))
    with namespaced_hosts(["h2", "h3"]) as hosts:
        hosts = hosts[:1]
        extra = [*FAST_SERVER_ARGS, *server_args(hosts, base / "hosts.toml")]
        with running_server_with_env(base / "data", {}, engines=0, extra_args=extra) as server:
            connection = base / "data" / "ipython" / "security" / "ipcontroller-tether-client.json"
            raw = ipp.Client(str(connection), timeout=10)
            with grpc.insecure_channel(server.address) as channel:
                tasks = task_service_pb2_grpc.TaskServiceStub(channel)
                engine = raw.ids[0]
                tether_ms: list[float] = []
                raw_ms: list[float] = []
                _tether_once(tasks), _raw_once(raw, engine)  # warm-up
                for _ in range(a.pairs):
                    raw_ms.append(_raw_once(raw, engine))
                    tether_ms.append(_tether_once(tasks))
            raw.close()
    for name, values in (("raw send_signal", raw_ms), ("tether InterruptTask", tether_ms)):
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(
            f"{name:22s} median {statistics.median(values):7.1f} ms  p90 {p90:7.1f} ms  "
            f"max {max(values):7.1f} ms  (n={len(values)})"
        )
    print(
        f"median ratio tether/raw: {statistics.median(tether_ms) / statistics.median(raw_ms):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
