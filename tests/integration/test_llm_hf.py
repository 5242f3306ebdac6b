"""llm.generate on Hugging Face checkpoints, through a real server and cluster (CPU).

Two checkpoints are made at test time (``hf_random.build_checkpoint``: a small Llama
with random weights and a tokenizer trained on a short multilingual text), one with a
byte-level BPE and one with a SentencePiece-style Metaspace vocabulary, and served with
``--model NAME=PATH`` exactly as an operator would. ``--allow-model-path`` opens one
directory for client paths. One server for the module.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

pytest.importorskip("transformers")

import tether
from tests.support import ServerProcess
from tether.v1 import cluster_service_pb2 as cpb
from tether.v1 import task_pb2 as tpb
from tether.v1 import task_service_pb2 as spb
from tether_server.tasks import hf_random, hf_text

from .helpers import (
    TaskStream,
    error_info,
    llm_server,
    seconds,
    stream_token,
    struct,
    submit,
    usable_engines,
    wait_pool,
    wait_terminal,
)

pytestmark = pytest.mark.llm

MODELS = {"bpe": "byte_bpe", "sp": "metaspace"}
SHAPE = hf_random.Shape(hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, context=1024)
PROMPT = "Hello wörld, 東京 says:"
LONG = 900  # tokens: a few seconds on this box, long enough to interrupt mid-way
TIMEOUT = seconds(300)
RSS_TOLERANCE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        name: hf_random.build_checkpoint(root / name, style=style, shape=SHAPE, seed=1)
        for name, style in MODELS.items()
    }


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    allowed = tmp_path_factory.mktemp("allowed")
    shutil.copytree(checkpoints["sp"], allowed / "mine")
    return allowed


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], allowed_dir: Path
) -> Iterator[ServerProcess]:
    args = ["--rss-tolerance", f"{RSS_TOLERANCE // 2**20}MiB"]
    for name, path in checkpoints.items():
        args += ["--model", f"{name}={path}"]
    args += ["--allow-model-path", str(allowed_dir)]
    yield from llm_server(tmp_path_factory, "llm-hf-server", *args)


def args(model: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "model": model, "max_tokens": 120, **extra}


def run(tasks: Any, task_args: dict[str, Any]) -> tuple[tpb.Task, list[str]]:
    """Submit, follow the stream to the end; the finished task (FULL) and its chunks."""
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=task_args, timeout=TIMEOUT)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        _, terminal = stream.terminal(timeout=240)
        chunks = [e.output_chunk for _, e in stream.of_type(spb.TASK_EVENT_TYPE_OUTPUT)]
    assert terminal.task.state == tpb.TASK_STATE_SUCCEEDED, terminal.task.error
    full = tasks.GetTask(spb.GetTaskRequest(name=task.name, view=tpb.TASK_VIEW_FULL), timeout=10)
    return full.task, chunks


def result_of(task: tpb.Task) -> dict[str, Any]:
    result = json_format.MessageToDict(task.result)
    assert isinstance(result, dict)
    return result


class References:
    """Uninterrupted runs, computed once per argument set."""

    def __init__(self, tasks: Any) -> None:
        self.tasks = tasks
        self.done: dict[str, dict[str, Any]] = {}

    def get(self, task_args: dict[str, Any]) -> dict[str, Any]:
        key = repr(sorted(task_args.items()))
        if key not in self.done:
            self.done[key] = result_of(run(self.tasks, task_args)[0])
        return self.done[key]


@pytest.fixture(scope="module")
def references(tasks: Any) -> References:
    return References(tasks)


# --------------------------------------------------------------------------- catalog
def test_get_cluster_lists_the_operators_models_with_their_context(
    cluster: Any, server: ServerProcess
) -> None:
    response = cluster.GetCluster(cpb.GetClusterRequest(), timeout=10)
    models = {m.name: m for m in response.models}
    for name in MODELS:
        assert (models[name].kind, models[name].context_length, models[name].chat) == (
            "hf",
            SHAPE.context,
            True,
        )
    assert (models["tiny"].kind, models["tiny"].context_length) == ("builtin", 2048)
    assert [m.name for m in response.models][:2] == ["bpe", "sp"]
    assert response.model_paths_allowed
    with tether.Client(server.address) as client:  # the Python client's view of the same
        seen = client.cluster()
    assert [m.name for m in seen.models] == [m.name for m in response.models]
    assert seen.models[0] == tether.Model("bpe", "hf", SHAPE.context, chat=True)
    assert seen.model_paths_allowed


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("model", list(MODELS))
def test_streamed_chunks_concatenate_to_the_result_text(
    tasks: Any, cluster: Any, checkpoints: dict[str, Path], model: str
) -> None:
    wait_pool(cluster, 2)
    task, chunks = run(tasks, args(model, temperature=0.9, seed=11, max_tokens=200))
    result = result_of(task)
    assert chunks and all(chunks)
    assert "".join(chunks) == result["text"] == task.output
    assert result["model"] == model and result["device"] == "cpu"
    tokenizer = hf_text.load_tokenizer(str(checkpoints[model]))
    assert result["prompt_tokens"] == len(tokenizer.encode(PROMPT))
    assert result["finish_reason"] in ("length", "eos")
    if result["finish_reason"] == "length":
        assert result["completion_tokens"] == 200
    timings = result["timings"]
    assert timings["time_to_first_token_seconds"] > 0 and timings["tokens_per_second"] > 0


def test_chat_messages_are_rendered_with_the_models_chat_template(
    tasks: Any, checkpoints: dict[str, Path]
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Grüße! What is 東京?"},
    ]
    task, chunks = run(tasks, {"messages": messages, "model": "sp", "max_tokens": 40})
    result = result_of(task)
    tokenizer = hf_text.load_tokenizer(str(checkpoints["sp"]))
    assert result["prompt_tokens"] == len(hf_text.encode_request(tokenizer, None, messages))
    assert "".join(chunks) == result["text"]


def test_generation_ends_before_the_first_stop_sequence(tasks: Any, references: References) -> None:
    reference = references.get(args("bpe", max_tokens=120))
    text = reference["text"]
    assert len(text) > 30, "the reference run is long enough to cut"
    stop = text[20:23]
    task, chunks = run(tasks, args("bpe", max_tokens=120, stop=[stop, "never-generated"]))
    result = result_of(task)
    assert result["finish_reason"] == "stop"
    assert result["text"] == text[: text.index(stop)] == "".join(chunks)


# --------------------------------------------------------------------------- interrupt, resume
def interrupt_mid_generation(tasks: Any, cluster: Any, task_args: dict[str, Any]) -> tpb.Task:
    wait_pool(cluster, 2)
    token = stream_token(tasks)
    task = submit(tasks, "llm.generate", args=task_args, timeout=TIMEOUT)
    with TaskStream(tasks, task.name, resume_token=token) as stream:
        stream.wait_for(lambda e: e.type == spb.TASK_EVENT_TYPE_OUTPUT, timeout=120, count=10)
        tasks.InterruptTask(spb.InterruptTaskRequest(name=task.name, reason="test"), timeout=10)
        stream.terminal(timeout=30)
    return tasks.GetTask(
        spb.GetTaskRequest(name=task.name, view=tpb.TASK_VIEW_FULL), timeout=10
    ).task


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5, "top_p": 0.9, "top_k": 50}]
)
def test_an_interrupted_generation_frees_its_memory_and_resumes_to_the_same_text(
    tasks: Any, cluster: Any, references: References, sampling: dict[str, Any]
) -> None:
    task_args = args("sp", max_tokens=LONG, **sampling)
    stopped = interrupt_mid_generation(tasks, cluster, task_args)
    assert stopped.state == tpb.TASK_STATE_INTERRUPTED
    assert stopped.interrupt.final_stage == tpb.ESCALATION_STAGE_SIGINT
    resources = stopped.resources
    assert resources.reclaimed, resources.summary
    assert resources.rss_after_bytes - resources.rss_before_bytes <= RSS_TOLERANCE
    assert not resources.engine_recycled
    time.sleep(0.5)  # a recycled engine would be STOPPING or LOST by now
    assert stopped.engine_id in {e.id for e in usable_engines(cluster)}
    assert stopped.has_checkpoint

    reference = references.get(task_args)
    assert reference["finish_reason"] == "length", "the reference runs to max_tokens"
    assert stopped.output and len(stopped.output) < len(reference["text"])
    assert reference["text"].startswith(stopped.output)

    resumed = submit(
        tasks, "llm.generate", args=task_args, resume_from=stopped.name, timeout=TIMEOUT
    )
    done = wait_terminal(tasks, resumed.name, 240)
    assert done.state == tpb.TASK_STATE_SUCCEEDED, done.error
    full = tasks.GetTask(spb.GetTaskRequest(name=resumed.name, view=tpb.TASK_VIEW_FULL), timeout=10)
    result = result_of(full.task)
    assert result["text"] == reference["text"] == full.task.output
    assert 0 < result["resumed_tokens"] < LONG
    assert result["completion_tokens"] == LONG


# --------------------------------------------------------------------------- validation
def refused(tasks: Any, task_args: dict[str, Any]) -> tuple[str, list[str]]:
    before = len(tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks)
    request = spb.SubmitTaskRequest(task="llm.generate", args=struct(task_args))
    with pytest.raises(grpc.RpcError) as caught:
        tasks.SubmitTask(request, timeout=10)
    code, reason, _, fields = error_info(caught.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    after = len(tasks.ListTasks(spb.ListTasksRequest(page_size=1000), timeout=10).tasks)
    assert after == before, "a refused request leaves no task behind"
    return reason, fields


@pytest.mark.parametrize(
    ("task_args", "reason", "fields"),
    [
        ({"prompt": "x", "model": "gpt-9"}, "UNKNOWN_MODEL", ["args.model"]),
        (
            {"prompt": "x", "model": "bpe", "max_tokens": SHAPE.context},
            "CONTEXT_LENGTH_EXCEEDED",
            ["args.max_tokens"],
        ),
        ({"prompt": "x", "max_tokens": 100_000}, "CONTEXT_LENGTH_EXCEEDED", ["args.max_tokens"]),
        ({"prompt": "x", "model": "sp", "top_p": 1.5}, "INVALID_ARGUMENTS", ["args.top_p"]),
        (
            {"prompt": "x", "model": "sp", "temperature": -1, "top_k": -2},
            "INVALID_ARGUMENTS",
            ["args.temperature", "args.top_k"],
        ),
        ({"prompt": "x", "model": "sp", "max_tokenz": 5}, "INVALID_ARGUMENTS", ["args"]),
        (
            {"messages": [{"role": "user"}], "model": "sp"},
            "INVALID_ARGUMENTS",
            ["args.messages[0]"],
        ),
        ({"prompt": "x", "model_path": "/etc"}, "MODEL_PATH_NOT_ALLOWED", ["args.model_path"]),
    ],
)
def test_bad_requests_are_refused_at_submit_with_error_info_and_bad_request(
    tasks: Any, task_args: dict[str, Any], reason: str, fields: list[str]
) -> None:
    assert refused(tasks, task_args) == (reason, fields)


def test_a_prompt_one_token_too_long_for_the_context_is_refused_and_one_less_runs(
    tasks: Any, checkpoints: dict[str, Path]
) -> None:
    tokenizer = hf_text.load_tokenizer(str(checkpoints["bpe"]))
    prompt_tokens = len(tokenizer.encode(PROMPT))
    fits = args("bpe", max_tokens=SHAPE.context - prompt_tokens)
    assert refused(tasks, {**fits, "max_tokens": fits["max_tokens"] + 1})[0] == (
        "CONTEXT_LENGTH_EXCEEDED"
    )
    assert submit(tasks, "llm.generate", args={**fits, "max_tokens": 1}).name


# --------------------------------------------------------------------------- client paths
def test_a_client_path_inside_the_allowed_directory_runs(tasks: Any, allowed_dir: Path) -> None:
    task, chunks = run(
        tasks, {"prompt": PROMPT, "model_path": str(allowed_dir / "mine"), "max_tokens": 20}
    )
    result = result_of(task)
    assert result["model"] == str((allowed_dir / "mine").resolve())
    assert "".join(chunks) == result["text"]


def test_a_client_path_outside_the_allowed_directory_is_refused(
    tasks: Any, checkpoints: dict[str, Path], allowed_dir: Path
) -> None:
    escape = allowed_dir / "escape"
    escape.symlink_to(checkpoints["bpe"])
    for path in (checkpoints["bpe"], escape, allowed_dir / ".." / checkpoints["bpe"].name):
        assert refused(tasks, {"prompt": "x", "model_path": str(path)}) == (
            "MODEL_PATH_NOT_ALLOWED",
            ["args.model_path"],
        )
