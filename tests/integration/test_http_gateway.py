"""The browser's contract: tether.v1 over the HTTP gateway, with auth on.

The same RPC answers the same through gRPC and through the gateway: the same message
in protobuf's JSON mapping, the same code, the same ErrorInfo. With ``--auth-tokens``
every RPC and /metrics need a bearer token, the owner/admin rule holds, the probes stay
open, and no token ever reaches the log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests.support import REPO, ServerProcess, free_port
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether.v1 import task_service_pb2_grpc

from .helpers import error_info, stream_token, submit, wait_state, wait_terminal
from .http_helpers import call, error_reason, get, http_server, scrape, serve_http, stream, value

ALICE = "alice-admin-token-3f9a"  # admin
BOB = "bob-user-token-77c1"
CAROL = "carol-user-token-01de"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    root = tmp_path_factory.mktemp("http-gateway")
    tokens = root / "tokens"
    tokens.write_text(f"{ALICE} alice admin\n{BOB} bob\n{CAROL} carol\n")
    yield from serve_http(root / "data", "--auth-tokens", str(tokens), "--log-level", "INFO")


@pytest.fixture(scope="module")
def base(served: tuple[ServerProcess, str]) -> str:
    return served[1]


@pytest.fixture(scope="module")
def tasks(served: tuple[ServerProcess, str]) -> Iterator[Any]:
    """A TaskService stub that sends Alice's (admin) token on every call."""

    def as_alice(context: Any, callback: Any) -> None:
        callback([("authorization", f"Bearer {ALICE}")], None)

    creds = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(), grpc.metadata_call_credentials(as_alice)
    )
    with grpc.secure_channel(served[0].address, creds) as ch:
        yield task_service_pb2_grpc.TaskServiceStub(ch)


def test_an_answer_is_the_grpc_message_in_protobuf_json_mapping(base: str, tasks: Any) -> None:
    status, answer = call(
        base, "TaskService/SubmitTask", {"task": "demo.echo", "args": {"value": [1, "a"]}}, ALICE
    )
    assert status == 200
    name = answer["task"]["name"]
    assert answer["task"]["state"] == "TASK_STATE_PENDING"
    assert answer["task"]["owner"] == "alice"
    wait_terminal(tasks, name)
    over_grpc = tasks.GetTask(spb.GetTaskRequest(name=name), timeout=10)
    status, over_http = call(base, "TaskService/GetTask", {"name": name}, ALICE)
    assert status == 200
    assert over_http == json_format.MessageToDict(over_grpc)
    assert over_http["task"]["result"] == [1, "a"]


def test_errors_carry_the_grpc_code_and_error_info(base: str, tasks: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        tasks.GetTask(spb.GetTaskRequest(name="tasks/missing"), timeout=10)
    code, reason, metadata, _ = error_info(caught.value)
    status, error = call(base, "TaskService/GetTask", {"name": "tasks/missing"}, ALICE)
    assert (status, error["code"]) == (404, "not_found")
    assert code == grpc.StatusCode.NOT_FOUND
    assert (
        error_reason(error) == (reason, metadata) == ("TASK_NOT_FOUND", {"name": "tasks/missing"})
    )
    assert error["message"] == caught.value.details()


def test_validation_errors_carry_bad_request_field_violations(base: str) -> None:
    status, error = call(base, "TaskService/SubmitTask", {"args": {}}, ALICE)
    assert (status, error["code"]) == (400, "invalid_argument")
    bad = next(d for d in error["details"] if d["type"] == "google.rpc.BadRequest")
    assert [v["field"] for v in bad["debug"]["fieldViolations"]] == ["task"]


def test_interrupt_of_a_finished_task_is_failed_precondition(base: str, tasks: Any) -> None:
    task = submit(tasks, "demo.echo", args={"value": 1})
    wait_terminal(tasks, task.name)
    status, error = call(base, "TaskService/InterruptTask", {"name": task.name}, ALICE)
    assert (status, error["code"]) == (400, "failed_precondition")
    assert error_reason(error)[0] == "TASK_ALREADY_TERMINAL"


def test_malformed_json_is_refused_with_invalid_argument(base: str) -> None:
    status, error = call(base, "TaskService/SubmitTask", {"task": "demo.echo", "nope": 1}, ALICE)
    assert (status, error["code"]) == (400, "invalid_argument")
    assert error_reason(error)[0] == "INVALID_JSON"


def test_stream_replays_from_a_token_like_grpc_and_ends_ok(base: str, tasks: Any) -> None:
    token = stream_token(tasks)
    task = submit(tasks, "demo.count", args={"n": 3, "interval": 0.01})
    wait_terminal(tasks, task.name)
    request = {"name": task.name, "resumeToken": token}
    envelopes = list(stream(base, "TaskService/StreamTaskStatus", request, ALICE))
    *messages, (end_flags, end) = envelopes
    assert end_flags == 0x02 and end == {}
    http_events = [m["taskEvent"] for _, m in messages if "taskEvent" in m]
    grpc_events = [
        json_format.MessageToDict(m.task_event)
        for m in tasks.StreamTaskStatus(
            spb.StreamTaskStatusRequest(name=task.name, resume_token=token), timeout=30
        )
        if m.HasField("task_event")
    ]
    assert http_events == grpc_events
    revisions = [int(e["revision"]) for e in http_events]  # int64: a JSON string
    assert revisions == sorted(set(revisions))
    chunks = "".join(e.get("outputChunk", "") for e in http_events)
    assert chunks == "step 1\nstep 2\nstep 3\n"


def _buf_curl(
    base: str, method: str, body: dict[str, Any], token: str
) -> subprocess.CompletedProcess[str]:
    """buf's own Connect client (binary codec), with the schema from protos/."""
    buf = str(Path(sys.executable).parent / "buf")
    auth = f"Authorization: Bearer {token}"
    url = f"{base}/tether.v1.{method}"
    done = subprocess.run(
        [buf, "curl", "--schema", "protos", "-H", auth, "-d", json.dumps(body), url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done


def test_a_connect_client_calls_the_gateway(base: str, tasks: Any) -> None:
    done = _buf_curl(base, "ClusterService/GetCluster", {}, ALICE)
    assert done.returncode == 0, done.stderr
    assert "demo.count" in json.loads(done.stdout)["registeredTasks"]
    task = submit(tasks, "demo.count", args={"n": 2, "interval": 0.01})
    done = _buf_curl(base, "TaskService/StreamTaskStatus", {"name": task.name}, ALICE)
    assert done.returncode == 0, done.stderr
    assert '"state": "TASK_STATE_SUCCEEDED"' in done.stdout
    done = _buf_curl(base, "TaskService/GetTask", {"name": "tasks/missing"}, ALICE)
    assert done.returncode != 0 and "TASK_NOT_FOUND" in done.stdout + done.stderr


def test_an_unknown_content_type_is_415(base: str) -> None:
    request = urllib.request.Request(
        f"{base}/tether.v1.ClusterService/GetCluster",
        data=b"{}",
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {ALICE}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 415
    assert error_reason(json.loads(caught.value.read()))[0] == "UNSUPPORTED_CONTENT_TYPE"


def test_stream_errors_end_the_stream_with_the_code(base: str) -> None:
    request = {"name": "tasks/missing"}
    ((flags, end),) = list(stream(base, "TaskService/StreamTaskStatus", request, ALICE))
    assert flags == 0x02 and end["error"]["code"] == "not_found"


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(base: str) -> None:
    for token in ("", "wrong-token"):
        status, error = call(base, "ClusterService/GetCluster", {}, token)
        assert (status, error["code"]) == (401, "unauthenticated")
        assert error_reason(error)[0] == "UNAUTHENTICATED"
    assert call(base, "ClusterService/GetCluster", {}, BOB)[0] == 200


def test_with_tokens_any_host_is_answered(base: str) -> None:
    # The DNS-rebinding guard (web/hosts.py) is for auth off: a rebound page has no token.
    assert call(base, "ClusterService/GetCluster", {}, BOB, host="proxy.example")[0] == 200


def test_only_the_owner_or_an_admin_may_interrupt(base: str, tasks: Any) -> None:
    _, answer = call(
        base, "TaskService/SubmitTask", {"task": "demo.sleep", "args": {"seconds": 30}}, BOB
    )
    name = answer["task"]["name"]
    wait_state(tasks, name, {tpb.TASK_STATE_RUNNING})
    status, error = call(base, "TaskService/InterruptTask", {"name": name}, CAROL)
    assert (status, error["code"]) == (403, "permission_denied")
    assert error_reason(error)[1]["owner"] == "bob"
    status, answer = call(base, "TaskService/InterruptTask", {"name": name, "reason": "mine"}, BOB)
    assert status == 200 and answer["task"]["interrupt"]["requestedBy"] == "bob"
    assert wait_terminal(tasks, name).state == tpb.TASK_STATE_INTERRUPTED
    _, other = call(
        base, "TaskService/SubmitTask", {"task": "demo.sleep", "args": {"seconds": 30}}, BOB
    )
    wait_state(tasks, other["task"]["name"], {tpb.TASK_STATE_RUNNING})
    status, _ = call(base, "TaskService/InterruptTask", {"name": other["task"]["name"]}, ALICE)
    assert status == 200  # an admin may
    wait_terminal(tasks, other["task"]["name"])


def test_metrics_need_a_token_and_probes_and_the_page_do_not(base: str) -> None:
    status, headers, _ = get(base + "/metrics")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert get(base + "/metrics", "wrong")[0] == 401
    assert value(scrape(base, BOB), "tether_engines_target") == 2
    assert get(base + "/readyz")[0] == 200
    assert get(base + "/healthz")[0] == 200
    status, headers, body = get(base + "/")
    assert status == 200 and b'id="auth-form"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(base + "/static/js/main.js")[0] == 200


def test_no_token_reaches_the_log(served: tuple[ServerProcess, str], base: str) -> None:
    call(base, "ClusterService/GetCluster", {}, "some-wrong-token-zz")
    get(base + "/metrics", BOB)
    text = served[0].log_text()
    assert "POST /tether.v1.ClusterService/GetCluster" in text  # the access log is on
    for token in (ALICE, BOB, CAROL, "some-wrong-token-zz"):
        assert token not in text


def test_metrics_on_their_own_address_leave_the_main_one(tmp_path: Path) -> None:
    metrics_port = free_port()
    proc, base = http_server(
        tmp_path / "data", "--metrics-listen", f"127.0.0.1:{metrics_port}", engines=1
    )
    try:
        assert get(base + "/metrics")[0] == 404
        side = f"http://127.0.0.1:{metrics_port}"
        assert value(scrape(side), "tether_engines_target") == 1
        assert json.loads(get(side + "/readyz")[2])["status"] == "SERVING"
        assert get(side + "/")[0] == 404  # no dashboard and no RPCs there
    finally:
        proc.stop()
        proc.kill_leftovers()
