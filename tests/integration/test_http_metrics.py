"""/metrics, /healthz, /readyz and JSON logs of a real server during a real run.

One server for the module (two engines, short graces, ``--log-format json`` at INFO).
Each test scrapes before and after what it does and checks that the counters and
histograms moved as they should, parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ServerProcess
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .conftest import wait_for
from .helpers import seconds, submit, usable_engines, wait_in_c_call, wait_state, wait_terminal
from .http_helpers import get, names, scrape, serve_http, value

LATENCY = "tether_interrupt_latency_seconds_count"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    data = tmp_path_factory.mktemp("http-metrics") / "data"
    yield from serve_http(data, "--log-format", "json", "--log-level", "INFO")


@pytest.fixture(scope="module")
def server(served: tuple[ServerProcess, str]) -> ServerProcess:
    """The module's server, for the shared gRPC stubs (tests/conftest.py)."""
    return served[0]


@pytest.fixture(scope="module")
def base(served: tuple[ServerProcess, str]) -> str:
    return served[1]


def _full_pool(cluster: Any) -> None:
    wait_for(lambda: len(usable_engines(cluster)) >= 2, timeout=60)


def _interrupt(tasks: Any, name: str, sigint: float = 0.5, sigterm: float = 0.5) -> tpb.Task:
    grace = tpb.GracePeriods(sigint=seconds(sigint), sigterm=seconds(sigterm))
    tasks.InterruptTask(spb.InterruptTaskRequest(name=name, grace=grace, reason="t"), timeout=10)
    return wait_terminal(tasks, name, timeout=30)


def test_metrics_follow_prometheus_naming(base: str) -> None:
    samples = scrape(base)
    ours = {n for n in names(samples) if n.startswith("tether_")}
    assert {
        "tether_queue_depth",
        "tether_tasks_running",
        "tether_engines",
        "tether_engines_target",
        "tether_streams_open",
        "tether_stream_lagging_cutoffs_total",
        "tether_engines_lost_total",
        "tether_engine_replacements_total",
        "tether_engine_queued_tasks",
        "tether_engine_rss_bytes",
        "tether_engine_cpu_seconds_total",
        "tether_store_commit_duration_seconds_count",
        "tether_store_commit_failures_total",
    } <= ours
    assert "process_resident_memory_bytes" in names(samples)
    for name in ours:  # base units and _total, never a task id in a label
        assert not name.endswith(("_ms", "_milliseconds", "_kb", "_mib")), name
    assert all("id" not in dict(labels) for n, labels in samples if n.startswith("tether_"))


def test_submissions_and_finishes_are_counted_by_task_state_and_reason(
    base: str, tasks: Any, cluster: Any
) -> None:
    _full_pool(cluster)
    before = scrape(base)
    ok = submit(tasks, "demo.count", args={"n": 3, "interval": 0.01})
    bad = submit(tasks, "demo.fail")
    assert wait_terminal(tasks, ok.name).state == tpb.TASK_STATE_SUCCEEDED
    assert wait_terminal(tasks, bad.name).state == tpb.TASK_STATE_FAILED
    after = scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tether_tasks_submitted_total", task="demo.count") == 1
    assert moved("tether_tasks_submitted_total", task="demo.fail") == 1
    finished = "tether_tasks_finished_total"
    assert moved(finished, task="demo.count", state="SUCCEEDED", reason="NONE") == 1
    assert moved(finished, task="demo.fail", state="FAILED", reason="TASK_RAISED") == 1
    assert moved("tether_task_dispatch_latency_seconds_count", task="demo.count") == 1
    assert (
        moved("tether_task_run_duration_seconds_count", task="demo.count", state="SUCCEEDED") == 1
    )
    assert moved("tether_task_output_chunks_total", task="demo.count") == 3
    assert moved("tether_store_commit_duration_seconds_count") >= 1
    assert value(after, "tether_store_commit_failures_total") == 0


def test_gauges_show_running_work_engines_and_open_streams(
    base: str, tasks: Any, cluster: Any
) -> None:
    _full_pool(cluster)
    task = submit(tasks, "demo.sleep", args={"seconds": 30})
    wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
    request = spb.StreamTaskStatusRequest(name=task.name)
    watch = tasks.StreamTaskStatus(request, timeout=60)
    next(watch)  # the stream is open once its first message arrives
    try:
        samples = scrape(base)
        assert value(samples, "tether_tasks", state="RUNNING", task="demo.sleep") >= 1
        assert value(samples, "tether_tasks_running") >= 1
        assert value(samples, "tether_engines", state="BUSY") >= 1
        assert value(samples, "tether_engines_target") == 2
        assert value(samples, "tether_streams_open") >= 1
        assert value(samples, "tether_engine_rss_bytes") > 0  # live engines on this host
    finally:
        _interrupt(tasks, task.name)
        watch.cancel()


def test_interrupt_latency_is_observed_for_each_final_stage(
    base: str, tasks: Any, cluster: Any
) -> None:
    stages = {
        "SIGINT": ("demo.sleep", {"seconds": 60}),
        "SIGTERM": ("demo.stubborn", {"seconds": 60}),
        "SIGKILL": ("demo.c_call", {"seconds": 60}),
    }
    for stage, (name, args) in stages.items():
        _full_pool(cluster)
        before = scrape(base)
        task = submit(tasks, name, args=args)
        wait_state(tasks, task.name, {tpb.TASK_STATE_RUNNING})
        if name == "demo.c_call":
            wait_in_c_call(tasks, task.name)  # RUNNING means dispatched, not begun
        time.sleep(0.3)  # let the runtime arm its guard
        done = _interrupt(tasks, task.name, sigint=0.3, sigterm=0.3)
        assert tpb.EscalationStage.Name(done.interrupt.final_stage) == f"ESCALATION_STAGE_{stage}"
        after = scrape(base)
        assert (
            value(after, LATENCY, final_stage=stage)
            == value(before, LATENCY, final_stage=stage) + 1
        )
        requested = "tether_interrupts_requested_total"
        assert value(after, requested, task=name, cause="USER") == (
            value(before, requested, task=name, cause="USER") + 1
        )
        if stage == "SIGKILL":
            lost = "tether_engines_lost_total"
            assert value(after, lost) >= value(before, lost) + 1
            _full_pool(cluster)  # the replacement registers
            replaced = "tether_engine_replacements_total"
            assert value(scrape(base), replaced) >= value(before, replaced) + 1


def test_interrupt_of_a_queued_task_is_observed_as_dequeued(
    base: str, tasks: Any, cluster: Any
) -> None:
    _full_pool(cluster)
    blockers = [submit(tasks, "demo.sleep", args={"seconds": 30}, priority=10) for _ in range(2)]
    for b in blockers:
        wait_state(tasks, b.name, {tpb.TASK_STATE_RUNNING})
    before = scrape(base)
    queued = submit(tasks, "demo.echo", args={"value": 1})
    assert value(scrape(base), "tether_queue_depth") >= 1
    tasks.InterruptTask(spb.InterruptTaskRequest(name=queued.name), timeout=10)
    after = scrape(base)
    assert value(after, LATENCY, final_stage="DEQUEUED") == (
        value(before, LATENCY, final_stage="DEQUEUED") + 1
    )
    finished = "tether_tasks_finished_total"
    assert value(after, finished, task="demo.echo", state="CANCELLED") == (
        value(before, finished, task="demo.echo", state="CANCELLED") + 1
    )
    for b in blockers:
        _interrupt(tasks, b.name)


def test_engine_recycled_after_a_leak_is_counted(base: str, tasks: Any, cluster: Any) -> None:
    _full_pool(cluster)
    before = scrape(base)
    task = submit(tasks, "demo.leak", args={"mb": 200})
    done = wait_terminal(tasks, task.name)
    assert done.resources.engine_recycled
    after = scrape(base)
    recycles = "tether_engine_recycles_total"
    assert value(after, recycles, task="demo.leak") == value(before, recycles, task="demo.leak") + 1
    _full_pool(cluster)


def test_probes_mirror_grpc_health(base: str) -> None:
    status, _, body = get(base + "/readyz")
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    status, _, body = get(base + "/healthz?service=tether.v1.TaskService")
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    status, _, body = get(base + "/readyz?service=no.such.Service")
    assert status == 404 and json.loads(body)["status"] == "SERVICE_UNKNOWN"


def test_json_logs_have_one_object_a_line_with_task_and_engine_ids(
    served: tuple[ServerProcess, str], tasks: Any, cluster: Any
) -> None:
    proc, _ = served
    _full_pool(cluster)
    task = submit(tasks, "demo.echo", args={"value": "log me"})
    wait_terminal(tasks, task.name)
    task_id = task.name.removeprefix("tasks/")

    def lines() -> list[dict[str, Any]]:
        found = []
        for raw in proc.log_text().splitlines():
            if raw.startswith("{"):
                found.append(json.loads(raw))  # every JSON-looking line parses
        return found

    events = wait_for(
        lambda: [x for x in lines() if x.get("task_id") == task_id and x["state"] == "SUCCEEDED"]
    )
    line = events[0]
    assert line["logger"] == "tether_server.events" and line["level"] == "INFO"
    assert isinstance(line["engine_id"], int) and line["task"] == "demo.echo"
    assert line["time"].endswith("Z")


def test_metrics_scrapes_while_tasks_run_do_not_disturb_them(
    base: str, tasks: Any, cluster: Any
) -> None:
    _full_pool(cluster)
    stop = threading.Event()
    scrapes = []

    def scraper() -> None:
        while not stop.is_set():
            scrapes.append(scrape(base))

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    try:
        names_ = [
            submit(tasks, "demo.count", args={"n": 5, "interval": 0.02}).name for _ in range(4)
        ]
        assert all(wait_terminal(tasks, n).state == tpb.TASK_STATE_SUCCEEDED for n in names_)
    finally:
        stop.set()
        thread.join(10)
    assert scrapes
