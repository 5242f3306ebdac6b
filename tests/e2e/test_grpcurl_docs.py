"""Every grpcurl command in docs/api.md and README.md runs against a live server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess

from .grpcurl_recipes import documented_commands, fill, run

REPO = Path(__file__).resolve().parents[2]

_README_PLACEHOLDER = {
    "StreamTaskStatus": "tasks/COUNTING",
    "GetTask": "tasks/FINISHED",
    "InterruptTask": "tasks/SLEEPING",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("grpcurl") / "data", engines=2) as proc:
        yield proc


def _readme_commands() -> list[tuple[str, int]]:
    out = []
    for cmd, code in documented_commands((REPO / "README.md").read_text()):
        for method, placeholder in _README_PLACEHOLDER.items():
            if cmd.endswith(f"TaskService/{method}"):
                cmd = cmd.replace("tasks/ID", placeholder)
        out.append((cmd, code))
    return out


DOC_COMMANDS = documented_commands((REPO / "docs" / "api.md").read_text())


def test_the_docs_document_every_rpc() -> None:
    text = " ".join(cmd for cmd, _ in DOC_COMMANDS)
    for rpc in (
        "SubmitTask",
        "InterruptTask",
        "StreamTaskStatus",
        "GetTask",
        "ListTasks",
        "GetCluster",
        "Health/Check",
        " list",
    ):
        assert rpc in text, rpc


@pytest.mark.parametrize(("command", "expected"), DOC_COMMANDS + _readme_commands())
def test_documented_grpcurl_command_works(
    server: ServerProcess, command: str, expected: int
) -> None:
    code, out = run(fill(command, server.address), server.address)
    assert code == expected, out
    if expected == 0:
        assert "ERROR" not in out
    else:
        assert "tether.dev" in out or "DeadlineExceeded" in out or "Code:" in out
