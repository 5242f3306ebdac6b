"""The cluster layer on its own: a real embedded cluster, driven as the controller does.

The ipyparallel client tether holds does not subscribe to IOPub (tether reads its data
messages on a socket of its own) and resolves each request's output future with the
reply: these tests check that it still forgets every request it sent, that the data
messages still arrive, that tether's requests cause no IOPub status messages (other
requests still do), and that a request whose engine is killed fails with EngineError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from ipyparallel.error import RemoteError

from tether_server.cluster import hub_records
from tether_server.cluster.ipp import ClusterCallbacks, ClusterConfig, IpyparallelCluster
from tether_server.runtime import attempts


def spec(task_id: str, task: str = "demo.echo", **args: Any) -> dict[str, Any]:
    return {"task_id": task_id, "attempt": 1, "task": task, "args": args}


@contextlib.asynccontextmanager
async def one_engine(
    profile: Path,
    setup: dict[str, Any] | None = None,
    on_report: Callable[[str, int, str, Any], None] = lambda *_: None,
) -> AsyncIterator[tuple[IpyparallelCluster, int, dict[str, Any]]]:
    """An embedded cluster of one engine, set up as the controller does (plus ``setup``):
    the cluster, the engine's id and what its setup answered. Stopped on exit."""
    registered: asyncio.Queue[int] = asyncio.Queue()
    cluster = IpyparallelCluster(
        ClusterConfig(engines=1, profile_dir=profile),
        ClusterCallbacks(
            engine_registered=registered.put_nowait,
            engine_unregistered=lambda eid: None,
            task_message=on_report,
        ),
    )
    await cluster.start()
    try:
        engine = await asyncio.wait_for(registered.get(), timeout=60)
        info = await cluster.setup_engine(engine, {"engine_id": engine, **(setup or {})})
        yield cluster, engine, info
    finally:
        await cluster.stop()


def outstanding(client: Any) -> int:
    """Requests the client still counts as outstanding on some engine."""
    return sum(len(ids) for ids in client._outstanding_dict.values())


async def drive(profile: Path) -> tuple[list[Any], dict[str, int], list[tuple[str, str]]]:
    messages: list[tuple[str, str]] = []

    def on_report(task_id: str, attempt: int, kind: str, payload: Any) -> None:
        messages.append((task_id, kind))

    async with one_engine(profile, on_report=on_report) as (cluster, engine, _info):
        outcomes = [
            await cluster.run_task(engine, spec(f"t{i}", "demo.count", n=1, interval=0))
            for i in range(30)
        ]
        client: Any = cluster._client
        await asyncio.sleep(0.2)  # clean-up callbacks run in later loop turns
        left = {
            "futures": len(client._futures),
            "output_futures": len(client._output_futures),
            # ipyparallel's _send also sets metadata["submitted"] itself: one key, for good.
            "metadata": len([k for k in client.metadata if k != "submitted"]),
            "results": len(client.results),
            "pending": client.pending_requests(),
            "outstanding": outstanding(client),
        }
        return outcomes, left, messages


def test_the_client_forgets_every_request_and_data_messages_still_arrive(tmp_path: Path) -> None:
    outcomes, left, messages = asyncio.run(drive(tmp_path / "ipython"))
    assert [o["status"] for o in outcomes] == ["succeeded"] * 30
    assert [o["value"] for o in outcomes] == [1] * 30
    assert left == {
        "futures": 0,
        "output_futures": 0,
        "metadata": 0,
        "results": 0,
        "pending": 0,
        "outstanding": 0,
    }
    outputs = [task_id for task_id, kind in messages if kind == "output"]
    assert outputs == [f"t{i}" for i in range(30)]


async def quiet_run(profile: Path) -> tuple[dict[str, int], str]:
    """Tasks sent as the controller sends them (labelled), then unlabelled ones: the
    IOPub status messages each kind caused, and what the engine's log gained."""
    async with one_engine(profile, {"log_level": logging.ERROR}) as (cluster, engine, _info):
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(cluster._client._config["iopub"])
            await asyncio.sleep(0.5)  # a SUB socket hears nothing until it has joined
            logs = sorted((profile / "log").glob("*engine*.log"))
            assert logs, "the engine's output file was not found"
            before = {path: path.stat().st_size for path in logs}

            async def statuses() -> int:
                await asyncio.sleep(0.3)
                count = 0
                while await sub.poll(0):
                    topic = (await sub.recv_multipart())[0]
                    count += topic.endswith(b".status")
                return count

            # The setup request's own busy/idle may still be on its way: not counted.
            await statuses()
            counts = {}
            for i in range(10):
                label = hub_records.label("epoch", f"t{i}", 1)
                await cluster.run_task(engine, spec(f"t{i}", value=i), label)
            counts["labelled"] = await statuses()
            for i in range(10):
                await cluster.run_task(engine, spec(f"u{i}", value=i))
            counts["unlabelled"] = await statuses()
            gained = "".join(path.read_text()[before.get(path, 0) :] for path in logs)
            return counts, gained
        finally:
            sub.close(linger=0)


def test_tether_requests_publish_no_status_and_the_engine_logs_at_the_level_asked(
    tmp_path: Path,
) -> None:
    counts, gained = asyncio.run(quiet_run(tmp_path / "ipython"))
    # Another client's requests still get their busy and idle (kernel_tuning.py).
    assert counts == {"labelled": 0, "unlabelled": 20}
    assert "Handling apply_request" not in gained


async def strand(profile: Path) -> tuple[BaseException | None, int, int]:
    """A task's engine is killed while it runs: what its request gets, and what the
    client still holds afterwards."""
    async with one_engine(profile) as (cluster, engine, info):
        running = asyncio.ensure_future(
            cluster.run_task(engine, spec("s", task="demo.sleep", seconds=60))
        )
        await asyncio.sleep(1.0)
        os.kill(int(info["pid"]), signal.SIGKILL)
        error: BaseException | None = None
        try:
            await asyncio.wait_for(running, timeout=60)
        except Exception as exc:
            error = exc
        client: Any = cluster._client
        return error, client.pending_requests(), outstanding(client)


def test_a_killed_engine_fails_its_request_with_engine_error(tmp_path: Path) -> None:
    error, pending, outstanding = asyncio.run(strand(tmp_path / "ipython"))
    assert isinstance(error, RemoteError) and error.ename == "EngineError", repr(error)
    assert (pending, outstanding) == (0, 0)


async def early_signal(profile: Path) -> list[dict[str, Any]]:
    """SIGINT for an attempt before its request is sent, then the attempt, then SIGINT
    again, then another task: the four answers."""
    async with one_engine(profile) as (cluster, engine, _info):
        content = {"task_id": "e", "attempt": 1, "signal": "SIGINT"}
        held = await cluster.control_request(engine, attempts.SIGNAL_REQUEST, content)
        outcome = await cluster.run_task(engine, spec("e", task="demo.sleep", seconds=30))
        late = await cluster.control_request(engine, attempts.SIGNAL_REQUEST, content)
        after = await cluster.run_task(engine, spec("f", value=1))
        return [held, outcome, late, after]


def test_a_signal_sent_before_its_attempt_begins_is_held_and_raised_when_it_does(
    tmp_path: Path,
) -> None:
    held, outcome, late, after = asyncio.run(early_signal(tmp_path / "ipython"))
    assert (held["delivered"], held["held"]) == (False, True)
    # Raised as the task function is called: before its body registered its hook.
    assert (outcome["status"], outcome["stage"]) == ("interrupted", "SIGINT")
    assert (outcome["error_type"], outcome["hooks_run"]) == ("KeyboardInterrupt", 0)
    assert (late["delivered"], late["held"]) == (False, False)  # it ended
    assert (after["status"], after["value"]) == ("succeeded", 1)
