"""llm.generate on a Hugging Face checkpoint, in process: the decode loop's guarantees.

A random-weight Llama with a trained Metaspace tokenizer is written once into a temporary
directory (``hf_random.build_checkpoint``) and served as an operator would
(``--model`` settings in the registry), then driven with a recording context.
"""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tether_server.runtime import registry  # noqa: E402
from tether_server.tasks import hf, hf_random, llm, llm_catalog  # noqa: E402

pytestmark = pytest.mark.llm

PROMPT = "Grüße aus Köln:"


class Recorder:
    """A task context that records reports; ``interrupted`` flips in decode step N."""

    def __init__(self, resume_state: Any = None, interrupt_at: int | None = None) -> None:
        self.resume_state = resume_state
        self.interrupt_at = interrupt_at
        self.interrupted = False
        self.steps = 0
        self.chunks: list[str] = []
        self.checkpoints: list[Any] = []

    def emit(self, chunk: str) -> None:
        self.chunks.append(chunk)

    def progress(self, fraction: float, message: str = "") -> None:
        pass

    def checkpoint(self, state: Any) -> None:
        self.checkpoints.append(json.loads(json.dumps(state)))

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    @contextmanager
    def uninterruptible(self) -> Iterator[None]:
        self.steps += 1
        if self.interrupt_at is not None and self.steps >= self.interrupt_at:
            self.interrupted = True
        yield
        self.check()


@pytest.fixture(scope="module", autouse=True)
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = hf_random.build_checkpoint(
        tmp_path_factory.mktemp("hf") / "sp", style="metaspace", seed=2
    )
    before = registry.settings()
    registry.configure(llm_catalog.operator_settings({"sp": str(path)}))
    yield path
    registry.configure(before)
    hf.clear_model_cache()
    torch.set_num_threads(threads)


def generate(ctx: Recorder | None = None, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": PROMPT, "model": "sp", "device": "cpu", **kwargs}
    result = llm.generate(ctx or Recorder(), **args)
    result.pop("timings")
    return result


SAMPLED = {"temperature": 0.9, "seed": 4, "top_k": 40, "top_p": 0.95}


@pytest.mark.parametrize("sampling", [{}, SAMPLED])
def test_a_resumed_generation_gives_the_uninterrupted_text(sampling: dict[str, Any]) -> None:
    args = {"max_tokens": 60, **sampling}
    reference = generate(**args)
    first = Recorder(interrupt_at=17)
    with pytest.raises(KeyboardInterrupt):
        generate(first, **args)
    state = first.checkpoints[-1]
    assert len(state["generated_ids"]) == 17
    assert state["text"] == "".join(first.chunks)
    second = Recorder(resume_state=state)
    assert generate(second, **args) == {**reference, "resumed_tokens": 17}
    assert "".join(second.chunks) == reference["text"]


def test_an_interrupt_frees_the_kv_cache_before_the_task_ends(monkeypatch: Any) -> None:
    caches: list[weakref.ref[Any]] = []
    real = hf.HFCache.__init__

    def tracked(self: hf.HFCache, config: Any) -> None:
        real(self, config)
        caches.append(weakref.ref(self.cache))

    monkeypatch.setattr(hf.HFCache, "__init__", tracked)
    gc.disable()  # reference counting alone must free it: no cycle collection to help
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            generate(Recorder(interrupt_at=5), max_tokens=40)
        # The exception (and its traceback's frames) are still alive here, as they are
        # when the runtime formats the error: the cache must already be gone.
        assert caught.value is not None
        assert [ref() for ref in caches] == [None]
    finally:
        gc.enable()


def test_sampling_with_top_k_one_is_greedy() -> None:
    greedy = generate(max_tokens=24)
    assert generate(max_tokens=24, temperature=1.5, seed=9, top_k=1)["text"] == greedy["text"]


def test_a_stop_sequence_also_ends_a_resumed_generation_at_the_same_place() -> None:
    reference = generate(max_tokens=60)["text"]
    stop = reference[12:15]
    expected = reference[: reference.index(stop)]
    stopped = generate(max_tokens=60, stop=stop)
    assert (stopped["text"], stopped["finish_reason"]) == (expected, "stop")
    first = Recorder(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        generate(first, max_tokens=60, stop=stop)
    resumed = generate(Recorder(resume_state=first.checkpoints[-1]), max_tokens=60, stop=stop)
    assert resumed["text"] == expected


def test_a_checkpoint_of_other_sampling_or_stops_is_refused() -> None:
    first = Recorder(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        generate(first, max_tokens=20, **SAMPLED)
    state = first.checkpoints[-1]
    with pytest.raises(ValueError, match="top_p"):
        generate(Recorder(resume_state=state), max_tokens=20, **{**SAMPLED, "top_p": 0.5})
    with pytest.raises(ValueError, match="stop"):
        generate(Recorder(resume_state=state), max_tokens=20, stop=["x"], **SAMPLED)
    with pytest.raises(ValueError, match="model"):
        generate(Recorder(resume_state=state), max_tokens=20, model="tiny", **SAMPLED)


def test_the_weights_are_declared_resident() -> None:
    from tether_server.runtime.resources import take_snapshot

    generate(max_tokens=2)
    model = hf.get_model("sp", str(llm_catalog.configured_models()["sp"]), torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for p in model.module.parameters())
    assert take_snapshot(children=False).resident_host_bytes >= weights


def test_ids_beyond_the_tokenizer_vocabulary_are_never_sampled() -> None:
    model = hf.get_model("sp", str(llm_catalog.configured_models()["sp"]), torch.device("cpu"))
    vocab = len(model.tokenizer)
    logits = torch.zeros(vocab + 8)
    logits[vocab:] = 100.0
    assert int(model.scores(logits).argmax()) < vocab
