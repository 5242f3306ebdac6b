"""The LLM tasks and their model: tokenizer, KV cache, seeded sampling, interrupt and resume.

Everything runs the ``tiny`` model on the CPU (about a millisecond per token).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tether_server.runtime import registry  # noqa: E402
from tether_server.runtime.context import TaskContext  # noqa: E402
from tether_server.runtime.guard import GUARD, TaskSignals, call_task  # noqa: E402
from tether_server.runtime.registry import get as get_task  # noqa: E402
from tether_server.tasks import llm, llm_catalog, llm_model  # noqa: E402
from tether_server.tasks.llm_model import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    ByteTokenizer,
    ModelConfig,
    StreamDecoder,
)

pytestmark = pytest.mark.llm

CPU = torch.device("cpu")
PROMPT = "The engine said: "


class FakeContext:
    """Records what a task reports; ``interrupted`` flips during decode step ``interrupt_after``.

    Like the runtime's context, ``uninterruptible()`` raises ``KeyboardInterrupt`` when
    the block exits after an interrupt, and checkpoints must be JSON of at most 1 MiB.
    """

    def __init__(self, resume_state: Any = None, interrupt_after: int | None = None) -> None:
        self.resume_state = resume_state
        self.interrupted = False
        self.interrupt_after = interrupt_after
        self.chunks: list[str] = []
        self.checkpoints: list[Any] = []
        self.progress_reports: list[tuple[float, str]] = []

        self.steps = 0

    def emit(self, chunk: str) -> None:
        assert chunk, "no chunk is empty"
        self.chunks.append(chunk)

    def progress(self, fraction: float, message: str = "") -> None:
        self.progress_reports.append((fraction, message))

    def checkpoint(self, state: Any) -> None:
        encoded = json.dumps(state, allow_nan=False)
        assert len(encoded.encode()) <= 1024 * 1024
        self.checkpoints.append(json.loads(encoded))

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    @contextmanager
    def uninterruptible(self) -> Iterator[None]:
        # One block per decode step: an interrupt "arrives" inside step N.
        self.steps += 1
        if self.interrupt_after is not None and self.steps >= self.interrupt_after:
            self.interrupted = True
        yield
        self.check()


def generate(ctx: FakeContext | None = None, **kwargs: Any) -> dict[str, Any]:
    """llm.generate's result without its timings (which differ on every run)."""
    args: dict[str, Any] = {"prompt": PROMPT, "device": "cpu", **kwargs}
    result = llm.generate(ctx or FakeContext(), **args)
    timings = result.pop("timings")
    assert set(timings) == {
        "time_to_first_token_seconds",
        "decode_seconds",
        "tokens_per_second",
        "total_seconds",
    }
    assert all(value >= 0 for value in timings.values())
    return result


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    # The tiny model gains nothing from intra-op threads, and on a busy machine their
    # spinning makes each test several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> llm_model.LanguageModel:
    return llm_model.get_model("tiny", "", CPU)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_multibyte_utf8() -> None:
    text = "héllo wörld — 日本語 🎉"
    ids = ByteTokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert ByteTokenizer.decode(ids) == text
    assert ByteTokenizer.decode([BOS_ID, *ids, EOS_ID]) == text


def test_stream_decoder_never_splits_a_character() -> None:
    text = "aé🎉"
    decoder = StreamDecoder()
    pieces = [decoder.push([i]) for i in ByteTokenizer.encode(text)]
    assert pieces == ["a", "", "é", "", "", "", "🎉"]
    assert decoder.flush() == ""


def test_stream_decoder_matches_bulk_decoding_of_invalid_bytes() -> None:
    ids = [0xF0, 0x9F, 0x41, 0xC3, 0xA9, 0x80, 0xE6, 0x97]  # broken and trailing sequences
    decoder = StreamDecoder()
    streamed = "".join(decoder.push([i]) for i in ids) + decoder.flush()
    assert streamed == ByteTokenizer.decode(ids)
    assert streamed.endswith("\ufffd")


# --------------------------------------------------------------------------- model
def test_named_configs_count_their_parameters(tiny: llm_model.LanguageModel) -> None:
    counted = sum(p.numel() for p in tiny.module.parameters())
    assert tiny.config.parameter_count == counted
    assert llm_model.MODEL_CONFIGS["xl"].parameter_count > 10**10


def test_models_are_cached_per_name_and_device(tiny: llm_model.LanguageModel) -> None:
    assert llm_model.get_model("tiny", "", CPU) is tiny
    with pytest.raises(ValueError, match="unknown model"):
        llm_model.get_model("nope", "", CPU)


def test_weights_are_seeded() -> None:
    config = ModelConfig("seeded", d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    first = llm_model.build_model(config, CPU).module.state_dict()
    second = llm_model.build_model(config, CPU).module.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_kv_cache_decoding_gives_the_logits_of_a_full_forward(
    tiny: llm_model.LanguageModel,
) -> None:
    ids = [BOS_ID, *ByteTokenizer.encode("KV caches must not change the answer.")]
    reference = tiny.full_logits(ids)
    cache = tiny.new_cache(len(ids))
    prompt_length = 10
    stepped = [tiny.prefill(ids[:prompt_length], cache)]
    stepped += [tiny.decode(token, cache) for token in ids[prompt_length:]]
    torch.testing.assert_close(torch.stack(stepped[:-1]), reference[prompt_length - 1 : -1])
    assert cache.length == len(ids)


def test_a_chunk_after_a_cached_prefix_is_causal(tiny: llm_model.LanguageModel) -> None:
    ids = [BOS_ID, *ByteTokenizer.encode("prefix, then a chunk")]
    cache = tiny.new_cache(len(ids))
    tiny.prefill(ids[:7], cache)
    chunk_logits = tiny.module(torch.tensor([ids[7:]]), cache)[0]
    torch.testing.assert_close(chunk_logits, tiny.full_logits(ids)[7:])


def test_sampling_draws_depend_only_on_seed_and_step() -> None:
    logits = torch.linspace(-1.0, 1.0, llm_model.VOCAB_SIZE)
    draws = [llm_model.choose_token(logits, 1.0, seed=3, step=s) for s in range(20)]
    torch.manual_seed(123)  # the global RNG plays no part
    assert [llm_model.choose_token(logits, 1.0, seed=3, step=s) for s in range(20)] == draws
    assert llm_model.choose_token(logits, 0.0, seed=3, step=0) == EOS_ID  # argmax


# --------------------------------------------------------------------------- llm.generate
def test_greedy_generation_is_deterministic() -> None:
    first = generate(max_tokens=32)
    assert first == generate(max_tokens=32)
    assert first["tokens"] == 32
    assert first["finish_reason"] == "length"
    assert first["device"] == "cpu"
    assert first["model"] == "tiny"


def test_same_seed_samples_the_same_text_and_another_seed_does_not() -> None:
    first = generate(max_tokens=48, temperature=0.8, seed=7)
    assert first["text"] == generate(max_tokens=48, temperature=0.8, seed=7)["text"]
    assert first["text"] != generate(max_tokens=48, temperature=0.8, seed=8)["text"]


def test_the_chunks_make_the_text_of_the_generated_bytes() -> None:
    ctx = FakeContext()
    result = generate(ctx, max_tokens=40, temperature=0.8, seed=1, checkpoint_every=1)
    ids = ctx.checkpoints[-1]["generated_ids"]
    assert len(ids) == result["tokens"] == result["completion_tokens"] == 40
    assert result["prompt_tokens"] == 1 + len(PROMPT.encode())
    # Chunks are batched in time (a few ms), never split a character, never empty.
    assert 1 <= len(ctx.chunks) <= 40
    assert "".join(ctx.chunks) == result["text"] == ByteTokenizer.decode(ids)


def test_progress_ends_with_the_last_token() -> None:
    ctx = FakeContext()
    generate(ctx, max_tokens=10)
    assert ctx.progress_reports[-1] == (1.0, "token 10/10")
    fractions = [fraction for fraction, _ in ctx.progress_reports]
    assert fractions == sorted(fractions)


def test_checkpoints_come_every_checkpoint_every_tokens() -> None:
    ctx = FakeContext()
    result = generate(ctx, max_tokens=20, checkpoint_every=8)
    assert [len(c["generated_ids"]) for c in ctx.checkpoints] == [8, 16]
    last = ctx.checkpoints[-1]
    assert last["version"] == 2
    assert (last["request"]["seed"], last["model"]) == (0, "tiny")
    assert len(last["request"]["prompt_sha256"]) == 64
    assert result["text"].startswith(last["text"])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_resuming_after_an_interrupt_reproduces_the_uninterrupted_text(
    temperature: float,
) -> None:
    args: dict[str, Any] = {"max_tokens": 48, "temperature": temperature, "seed": 5}
    uninterrupted = generate(**args)
    assert uninterrupted["finish_reason"] == "length"

    first = FakeContext(interrupt_after=13)
    with pytest.raises(KeyboardInterrupt):
        generate(first, **args)
    state = first.checkpoints[-1]  # written at the interrupt, not only every 8 tokens
    assert len(state["generated_ids"]) == 13
    assert state["text"] == "".join(first.chunks)

    second = FakeContext(resume_state=state)
    resumed = generate(second, **args)
    assert resumed == {**uninterrupted, "resumed_tokens": 13}
    assert second.chunks[0] == state["text"]  # the old text, once, as one chunk
    assert "".join(second.chunks) == uninterrupted["text"]


def test_resuming_from_an_older_periodic_checkpoint_also_reproduces_the_text() -> None:
    args: dict[str, Any] = {"max_tokens": 40, "temperature": 0.8, "seed": 2}
    first = FakeContext(interrupt_after=30)
    with pytest.raises(KeyboardInterrupt):
        generate(first, checkpoint_every=8, **args)
    periodic = first.checkpoints[0]  # as if SIGKILL had ended the task after token 8
    assert len(periodic["generated_ids"]) == 8
    resumed = generate(FakeContext(resume_state=periodic), **args)
    assert resumed == {**generate(**args), "resumed_tokens": 8}


def test_a_resume_state_from_another_generation_is_refused() -> None:
    ctx = FakeContext()
    generate(ctx, max_tokens=8, seed=1)
    state = ctx.checkpoints[-1]
    with pytest.raises(ValueError, match="seed"):
        generate(FakeContext(resume_state=state), max_tokens=8, seed=2)
    with pytest.raises(ValueError, match="prompt"):
        generate(FakeContext(resume_state=state), prompt="other", max_tokens=8, seed=1)
    with pytest.raises(ValueError, match="checkpoint"):
        generate(FakeContext(resume_state={"version": 99}), max_tokens=8)
    with pytest.raises(ValueError, match="token ids below 256"):
        generate(FakeContext(resume_state={**state, "generated_ids": [300]}), max_tokens=8, seed=1)


def test_a_resume_state_that_went_through_protobuf_struct_still_resumes() -> None:
    first = FakeContext(interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        generate(first, max_tokens=12, seed=4)
    state = first.checkpoints[-1]
    as_struct = {
        **state,
        "request": {**state["request"], "seed": 4.0, "top_k": 0.0},
        "generated_ids": [float(i) for i in state["generated_ids"]],
    }
    resumed = generate(FakeContext(resume_state=as_struct), max_tokens=12, seed=4)
    assert resumed["text"] == generate(max_tokens=12, seed=4)["text"]


def test_generation_stops_at_eos() -> None:
    # With these seeded weights, this draw samples EOS after 4 tokens.
    result = generate(prompt="stop here", max_tokens=64, temperature=5.0, seed=0)
    assert result["finish_reason"] == "eos"
    assert result["tokens"] == 4


def test_a_prompt_longer_than_the_model_context_is_refused() -> None:
    with pytest.raises(ValueError, match="2048-token context"):
        generate(prompt="x" * 2000, max_tokens=64)


@pytest.fixture
def paths_allowed_under(tmp_path: Path) -> Iterator[Path]:
    """The registry settings of ``--allow-model-path tmp_path``, for one test."""
    before = registry.settings()
    registry.configure(llm_catalog.operator_settings({}, [str(tmp_path)]))
    yield tmp_path
    registry.configure(before)


def test_model_path_is_refused_unless_the_operator_allows_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_path is disabled"):
        generate(model_path=str(tmp_path))


def test_model_path_loads_saved_weights(paths_allowed_under: Path) -> None:
    tmp_path = paths_allowed_under
    config = ModelConfig(
        "mine", d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=256, weights_seed=9
    )
    saved = llm_model.build_model(config, CPU)
    llm_model.save_model(saved, tmp_path / "weights")
    assert json.loads((tmp_path / "weights" / "config.json").read_text())["name"] == "mine"

    result = generate(model_path=str(tmp_path / "weights"), max_tokens=16, temperature=0.8)
    assert result["model"] == "mine"
    ids = [BOS_ID, *ByteTokenizer.encode(PROMPT)]
    loaded = llm_model.get_model("", str(tmp_path / "weights"), CPU)
    torch.testing.assert_close(loaded.full_logits(ids), saved.full_logits(ids))
    with pytest.raises(ValueError, match=r"holds no config\.json"):
        generate(model_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="outside the directories"):
        generate(model_path=str(tmp_path.parent))


# --------------------------------------------------------------------------- runtime
def test_a_real_sigint_mid_step_ends_the_task_after_the_step_with_a_checkpoint() -> None:
    messages: list[dict[str, Any]] = []

    def sink(message: dict[str, Any]) -> None:
        messages.append(message)
        kinds = [m["tether"][0] for m in messages]
        if kinds.count("output") == 5 and not signals.sigints:
            os.kill(os.getpid(), signal.SIGINT)

    signals = TaskSignals()
    ctx = TaskContext("t1", 0, sink=sink, signals=signals)
    GUARD.install()
    GUARD.arm(signals)
    try:
        with pytest.raises(KeyboardInterrupt):
            call_task(signals, llm.generate, {"ctx": ctx, "prompt": PROMPT, "device": "cpu"})
    finally:
        GUARD.uninstall()
    checkpoints = [m["tether"][3] for m in messages if m["tether"][0] == "checkpoint"]
    assert 5 <= len(checkpoints[-1]["generated_ids"]) < 64  # stopped after the step
    assert checkpoints[-1]["text"] == ctx.output


def test_tasks_are_registered_with_their_json_arguments() -> None:
    registered = get_task("llm.generate")
    assert registered.takes_context
    assert registered.argument_names[:4] == ["prompt", "messages", "max_tokens", "temperature"]
    assert registered.validator is not None
    assert get_task("llm.stuck_cuda").takes_context
    assert get_task("llm.hold_memory").argument_names == ["mb", "seconds", "device"]


def test_importing_the_task_module_does_not_import_torch() -> None:
    code = "import sys, tether_server.tasks.llm; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_stuck_cuda_without_cuda_is_one_calibrated_c_call() -> None:
    started = time.perf_counter()
    result = llm.stuck_cuda(FakeContext(), seconds=0.3, device="cpu")
    elapsed = time.perf_counter() - started
    assert result["device"] == "cpu"
    assert 0.1 < elapsed < 1.5


def test_hold_memory_holds_then_frees_and_stops_when_interrupted() -> None:
    assert llm.hold_memory(FakeContext(), mb=2, seconds=0.1, device="cpu") == {
        "mb": 2,
        "device": "cpu",
        "seconds": 0.1,
    }
    ctx = FakeContext()
    ctx.interrupted = True
    with pytest.raises(KeyboardInterrupt):
        llm.hold_memory(ctx, mb=2, seconds=10, device="cpu")
