"""Streaming text out of token ids: the incremental detokenizer, stop sequences, batching.

The tokenizers are real ones, trained in memory on a short multilingual text
(``hf_random.build_tokenizer``): a GPT-2 style byte-level BPE and a SentencePiece/Llama
style Metaspace vocabulary with byte fallback. No file is read or written.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

pytest.importorskip("transformers")

from tether_server.tasks import hf_text
from tether_server.tasks.detokenize import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from tether_server.tasks.generation import ChunkBatcher
from tether_server.tasks.hf_random import build_tokenizer

pytestmark = pytest.mark.llm

STYLES = ["byte_bpe", "metaspace"]
CONTINUATIONS = [
    " world, and more words",
    " Grüße aus Köln",
    " 東京は晴れ",
    " 😀🎉 emoji",
    "  two spaces then text",
    " naïve café\nnew line ünïcödé ∞",
    " wörds outside the vocabulary: ʘ ǂ ҉ 🦜",
]


@pytest.fixture(scope="module", params=STYLES)
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return build_tokenizer(request.param, 400)


def stream(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(lambda i: hf_text.decode(tokenizer, i), prompt_ids)
    pieces = [detokenizer.push(token) for token in ids]
    return [*pieces, detokenizer.flush()]


def reference(tokenizer: Any, prompt_ids: list[int], ids: list[int]) -> str:
    """What the continuation reads as inside the whole text."""
    whole = hf_text.decode(tokenizer, prompt_ids + ids)
    prompt = hf_text.decode(tokenizer, prompt_ids)
    assert whole.startswith(prompt)
    return whole[len(prompt) :]


@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_streamed_pieces_concatenate_to_the_text_with_its_spaces_and_characters(
    tokenizer: Any, continuation: str
) -> None:
    prompt_ids = tokenizer.encode("Hello there", add_special_tokens=True)
    ids = tokenizer.encode("Hello there" + continuation, add_special_tokens=True)[len(prompt_ids) :]
    pieces = stream(tokenizer, prompt_ids, ids)
    assert "".join(pieces) == reference(tokenizer, prompt_ids, ids) == continuation
    assert not any(REPLACEMENT in piece for piece in pieces), "no character is ever split"


def test_the_first_generated_token_keeps_its_leading_space(tokenizer: Any) -> None:
    prompt_ids = tokenizer.encode("Hello", add_special_tokens=True)
    ids = tokenizer.encode("Hello world", add_special_tokens=True)[len(prompt_ids) :]
    first = next(piece for piece in stream(tokenizer, prompt_ids, ids) if piece)
    assert first.startswith(" w")


def test_a_character_split_over_byte_tokens_comes_out_whole_with_its_last_byte() -> None:
    tokenizer = build_tokenizer("byte_bpe", 300)
    prompt_ids = tokenizer.encode("x", add_special_tokens=True)
    ids = tokenizer.encode("x🦜", add_special_tokens=True)[len(prompt_ids) :]
    assert len(ids) >= 2  # the parrot is not in the vocabulary: its bytes are
    assert stream(tokenizer, prompt_ids, ids) == [""] * (len(ids) - 1) + ["🦜", ""]


def test_random_token_streams_concatenate_to_the_reference_when_their_bytes_are_text(
    tokenizer: Any,
) -> None:
    prompt_ids = tokenizer.encode("Once upon a time", add_special_tokens=True)
    rng = random.Random(7)
    checked = 0
    for _ in range(600):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))]
        pieces = stream(tokenizer, prompt_ids, ids)
        streamed = "".join(pieces)
        expected = reference(tokenizer, prompt_ids, ids)
        if REPLACEMENT not in expected:
            assert streamed == expected
            checked += 1
        assert all(piece for piece in pieces[:-1] if piece)  # pieces are whole strings
    assert checked > 30


def test_a_long_stream_keeps_its_window_short_and_its_text_exact(tokenizer: Any) -> None:
    text = " The quick brown fox jumps over the lazy dog. 東京は晴れ 😀" * 20
    prompt_ids = tokenizer.encode("Go:", add_special_tokens=True)
    ids = tokenizer.encode("Go:" + text, add_special_tokens=True)[len(prompt_ids) :]
    detokenizer = IncrementalDetokenizer(lambda i: hf_text.decode(tokenizer, i), prompt_ids)
    streamed = "".join(detokenizer.push(token) for token in ids) + detokenizer.flush()
    assert streamed == text
    assert len(detokenizer._ids) < 200


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement() -> None:
    tokenizer = build_tokenizer("byte_bpe", 300)
    prompt_ids = tokenizer.encode("x", add_special_tokens=True)
    ids = tokenizer.encode("x🦜", add_special_tokens=True)[len(prompt_ids) :][:2]
    pieces = stream(tokenizer, prompt_ids, ids)
    assert pieces[:-1] == ["", ""]
    assert pieces[-1] and set(pieces[-1]) == {REPLACEMENT}


# --------------------------------------------------------------------------- stop sequences
def feed(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.push(piece) for piece in pieces)
    return out + matcher.flush()


def test_text_before_a_stop_sequence_is_kept_and_the_rest_dropped() -> None:
    matcher = StopMatcher(["END"])
    assert feed(matcher, ["hello ", "wor", "ld EN", "D and more"]) == "hello world "
    assert matcher.stopped and matcher.matched == "END"


def test_a_possible_start_of_a_stop_sequence_is_held_until_decided() -> None:
    matcher = StopMatcher(["\n\n"])
    assert matcher.push("line\n") == "line"
    assert matcher.push("next") == "\nnext"
    assert not matcher.stopped


def test_the_earliest_of_several_stop_sequences_wins() -> None:
    matcher = StopMatcher(["b", "abc"])
    assert feed(matcher, ["xxab", "c"]) == "xxa"
    assert matcher.matched == "b"


def test_a_held_tail_is_released_at_the_end() -> None:
    matcher = StopMatcher(["STOP"])
    assert feed(matcher, ["the end ST"]) == "the end ST"
    assert not matcher.stopped


def test_without_stop_sequences_every_piece_passes_at_once() -> None:
    matcher = StopMatcher([])
    assert [matcher.push(p) for p in ["a", "b"]] == ["a", "b"]


# --------------------------------------------------------------------------- batching
def test_pieces_closer_than_the_interval_are_sent_together_and_nothing_is_lost() -> None:
    sent: list[str] = []
    batcher = ChunkBatcher(sent.append, interval=3600.0)
    for piece in ["a", "b", "", "c"]:
        batcher.add(piece)
    assert sent == ["a"]  # the first goes at once, the rest wait for the interval
    batcher.flush()
    assert sent == ["a", "bc"]
    assert batcher.output == "abc"


def test_with_a_zero_interval_every_piece_is_its_own_chunk() -> None:
    sent: list[str] = []
    batcher = ChunkBatcher(sent.append, interval=0.0)
    for piece in ["a", "b", "c"]:
        batcher.add(piece)
    assert sent == ["a", "b", "c"]
