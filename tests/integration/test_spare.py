"""A warm spare engine takes a killed engine's place at once; a new spare starts behind it."""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.support import FAST_SERVER_ARGS, ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import cluster_service_pb2_grpc, task_service_pb2_grpc
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb

from .conftest import wait_for
from .helpers import engines, seconds, submit, wait_in_c_call, wait_state, wait_terminal

READY = (cpb.ENGINE_STATE_IDLE, cpb.ENGINE_STATE_BUSY)


def test_a_spare_engine_runs_the_next_task_when_the_busy_engine_is_killed(tmp_path: Path) -> None:
    args = [*FAST_SERVER_ARGS, "--spare-engines", "1"]
    with (
        ServerProcess(tmp_path / "data", engines=1, extra_args=args) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        tasks = task_service_pb2_grpc.TaskServiceStub(channel)
        cluster = cluster_service_pb2_grpc.ClusterServiceStub(channel)
        pool = wait_for(
            lambda: len([e for e in engines(cluster) if e.state in READY]) == 2 and engines(cluster)
        )
        spare = [e.id for e in pool if e.spare]
        assert len(spare) == 1

        stuck = submit(tasks, "demo.c_call", args={"seconds": 60})
        running = wait_state(tasks, stuck.name, {tpb.TASK_STATE_RUNNING})
        wait_in_c_call(tasks, stuck.name)  # RUNNING means dispatched, not begun
        assert running.engine_id != spare[0]  # the spare takes no task while one is active
        queued = submit(tasks, "demo.echo", args={"value": "next"})
        assert (
            wait_state(tasks, queued.name, {tpb.TASK_STATE_PENDING}).state == tpb.TASK_STATE_PENDING
        )

        tasks.InterruptTask(
            spb.InterruptTaskRequest(
                name=stuck.name, grace=tpb.GracePeriods(sigint=seconds(0.2), sigterm=seconds(0.2))
            ),
            timeout=10,
        )
        ended = wait_terminal(tasks, stuck.name)
        assert ended.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGKILL
        done = wait_terminal(tasks, queued.name)
        assert done.state == tpb.TASK_STATE_SUCCEEDED
        assert done.engine_id == spare[0]  # the spare took over; no new engine was awaited

        # A replacement registers and becomes the new spare.
        after = wait_for(
            lambda: (
                (now := engines(cluster))
                and len([e for e in now if e.state in READY]) == 2
                and any(e.spare and e.id not in spare for e in now)
                and now
            ),
            timeout=60,
        )
        assert [e.id for e in after if e.state in READY and not e.spare] == spare
