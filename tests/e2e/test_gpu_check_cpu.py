"""bench/gpu_check.py on the CPU: the GPU check's whole path, without GPU numbers.

The script is run as the GPU machine runs it (a plain ``python bench/gpu_check.py``,
its own server and engines), with ``tiny`` and stuck_cuda's CPU fallback. The test
asserts that both scenarios completed and produced their numbers; it never judges how
fast anything was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import REPO

pytest.importorskip("torch")
pytestmark = [pytest.mark.llm, pytest.mark.timeout(240)]

SCRIPT = REPO / "bench" / "gpu_check.py"
RUN_TIMEOUT = 150


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu_check") / "tmp.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--budget", "140"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the script then stops its server in its finally.
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            stdout, _ = proc.communicate(timeout=10)
        pytest.fail(f"gpu_check.py ran past {RUN_TIMEOUT}s:\n{stdout[-4000:]}")
    assert out.is_file(), f"no JSON written (exit {proc.returncode}):\n{stdout[-4000:]}"
    data: dict[str, Any] = json.loads(out.read_text())
    data["_stdout"] = stdout
    data["_returncode"] = proc.returncode
    data["_server_log"] = out.with_suffix(".server.log")
    return data


def test_exits_zero_and_prints_the_report(results: dict[str, Any]) -> None:
    stdout = results["_stdout"]
    assert results["_returncode"] == 0, stdout[-4000:]
    assert results["errors"] == [], results["errors"]
    assert "tether GPU check" in stdout
    assert "(a) interrupt llm.generate" in stdout
    assert "(b) interrupt llm.stuck_cuda" in stdout
    assert results["_server_log"].is_file()
    assert results["device"] == "cpu"
    assert results["model"] == "tiny"


def test_generate_scenario_completed_with_numbers(results: dict[str, Any]) -> None:
    a = results["generate_interrupt"]
    assert results["completed"]["generate_interrupt"] is True
    assert a["interrupted_while_running"] is True
    assert a["tokens_seen_before_interrupt"] >= a["interrupt_after_tokens"]
    assert is_number(a["time_to_interrupted_ms"])
    assert is_number(a["interrupt_rpc_ms"])
    task = a["task"]
    assert task["state"] == "INTERRUPTED"
    assert task["final_stage"] in ("SIGINT", "SIGTERM")
    resources = task["resources"]
    for key in ("rss_before_mib", "rss_after_mib", "gpu_allocated_before_mib",
                "gpu_allocated_after_mib"):  # fmt: skip
        assert is_number(resources[key]), key
    assert isinstance(resources["reclaimed"], bool)
    assert isinstance(resources["engine_recycled"], bool)
    nxt = a["next_task"]
    assert nxt["state"] == "SUCCEEDED"
    assert isinstance(nxt["engine_id"], int)
    assert is_number(nxt["client"]["submit_to_running_ms"])
    assert isinstance(nxt["started_at_once"], bool)
    # No GPU here: the nvidia-smi samples are left out, not faked.
    assert "gpu_during" not in a


def test_stuck_scenario_completed_with_numbers(results: dict[str, Any]) -> None:
    b = results["stuck_kernel"]
    assert results["completed"]["stuck_kernel"] is True
    task = b["task"]
    assert task["state"] == "INTERRUPTED"
    assert task["final_stage"] == "SIGKILL"
    assert is_number(b["time_to_interrupted_ms"])
    assert set(b["stage_seen_ms"]) >= {"SIGKILL"}
    assert is_number(b["engine_process_gone_ms"])
    assert b["replacement_engine"] is not None
    assert is_number(b["replacement_registered_ms"])
    assert is_number(b["replacement_idle_ms"])
    nxt = b["next_task"]
    assert nxt["state"] == "SUCCEEDED"
    assert nxt["on_replacement_engine"] is True
    assert is_number(b["interrupt_to_next_running_ms"])
    assert "gpu_released_ms" not in b


def test_no_process_left_behind(results: dict[str, Any]) -> None:
    engine_pids = {
        e["pid"]
        for key in ("generate_interrupt", "stuck_kernel")
        for table in ("engines_before", "engines_after")
        for e in results[key].get(table, [])
        if e["pid"]
    }
    alive = [pid for pid in engine_pids if psutil.pid_exists(pid) and _is_engine(pid)]
    assert alive == []


def _is_engine(pid: int) -> bool:
    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return "ipyparallel" in cmd and os.getpid() != pid


def test_device_command_fits_the_tool() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--print-device-command"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    command, carry = out.stdout.strip().splitlines()
    assert len(command) <= 2000
    assert "bench/gpu_check.py --device cuda" in command
    assert carry == 'carry: [".whl"]'
    assert Path(REPO / "scripts" / "gpu_wheels.sh").is_file()
