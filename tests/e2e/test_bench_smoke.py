"""``python -m bench --quick`` end to end: the bench runs, prints its table and writes JSON.

A smoke run only: it checks that figures were produced, never what they are (timings
belong to ``make bench`` and docs/benchmarks.md, not to a test).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

from bench.harness import RUN_MARKER, leftover_processes
from tests.support import REPO

BENCHES = ("B3", "B6")


def test_quick_bench_run_prints_a_table_writes_json_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    nonce = uuid.uuid4().hex
    env = {**os.environ, RUN_MARKER: nonce}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--only", ",".join(BENCHES), "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        leftovers = leftover_processes(nonce)
        for leftover in leftovers:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
    assert proc.returncode == 0, output
    assert "environment: " in output and "ipyparallel" in output, output
    document = json.loads(out.read_text())
    assert document["quick"] is True
    assert {"python", "grpcio", "ipyparallel", "cores", "date"} <= set(document["environment"])
    results = {r["bench"]: r for r in document["results"]}
    assert set(results) == set(BENCHES)
    for bench_id, result in results.items():
        assert not result["error"], result["error"]
        assert result["rows"], f"{bench_id} produced no rows"
        for row in result["rows"]:
            assert isinstance(row["baseline"], float) and isinstance(row["tether"], float), row
            assert row["verdict"] in ("met", "MISSED", "info"), row
            assert f"| {bench_id} " in output and row["metric"] in output
    assert not leftovers, [p.pid for p in leftovers]
