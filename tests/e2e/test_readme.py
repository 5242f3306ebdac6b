"""The "Use it" snippets of README.md work as written (Python, CLI, TypeScript)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def _block(heading: str, lang: str) -> str:
    section = README.split(f"### {heading}\n", 1)[1]
    match = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert match, f"no ```{lang} block under {heading}"
    return match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("readme") / "data", engines=2) as proc:
        yield proc


def test_python_snippet_runs(server: ServerProcess) -> None:
    code = _block("Python", "python").replace("127.0.0.1:50051", server.address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "SUCCEEDED" in out.stdout


def test_cli_snippet_runs(server: ServerProcess) -> None:
    env = {**os.environ, "TETHER_ADDRESS": server.address}
    task_id = ""
    script = _block("CLI", "bash").strip().replace("\\\n", " ")  # continued lines
    for line in script.splitlines():
        argv = shlex.split(line.replace("ID", task_id), comments=True)
        argv[0] = str(BIN / "tether")
        if argv[1] == "submit" and "--wait" not in argv:
            argv += ["--output", "json"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, (line, out.stdout, out.stderr)
        if argv[1] == "submit" and "--wait" not in argv:
            document = json.loads(out.stdout)
            task = document["task"] if isinstance(document.get("task"), dict) else document
            task_id = task["name"].removeprefix("tasks/")


def test_typescript_snippet_matches_the_example_and_runs(server: ServerProcess) -> None:
    example = (REPO / "clients" / "typescript" / "example.ts").read_text()
    assert _block("TypeScript", "ts").strip() in example
    ts_dir = REPO / "clients" / "typescript"
    tsx = ts_dir / "node_modules" / ".bin" / "tsx"
    if not tsx.exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=ts_dir,
            check=True,
            timeout=300,
        )
    env = {**os.environ, "TETHER_ADDRESS": server.address}
    out = subprocess.run(
        [str(tsx), "example.ts"], cwd=ts_dir, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "SUCCEEDED" in out.stdout
    assert "result: 3" in out.stdout
