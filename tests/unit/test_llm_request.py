"""Submit-time validation of llm.generate: what is refused, with which reason and field.

Pure: the model is described by a ModelView (context length, chat template, a token
counter), so no tokenizer or file is involved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tether_server.runtime import registry
from tether_server.tasks import llm, llm_catalog  # noqa: F401  (registers llm.generate)
from tether_server.tasks.llm_request import (
    CONTEXT_LENGTH_EXCEEDED,
    MODEL_PATH_NOT_ALLOWED,
    UNKNOWN_MODEL,
    ModelView,
    check,
)


def words(prompt: str | None, messages: Sequence[Mapping[str, str]] | None) -> int:
    """A stand-in tokenizer: one token per word, two per chat message."""
    if messages is not None:
        return 2 * len(messages)
    return len((prompt or "").split())


def resolve(model: str, model_path: str) -> ModelView:
    if model_path:
        raise PermissionError("model_path is disabled on this server")
    if model == "chatty":
        return ModelView("chatty", 16, True, words)
    if model == "plain":
        return ModelView("plain", 16, False, words)
    raise LookupError(f"unknown model {model!r}")


def problems(**args: Any) -> list[tuple[str, str]]:
    bound = {"model": "chatty", "max_tokens": 4, **args}
    return [(v.field, v.reason) for v in check(bound, resolve)]


def test_a_request_that_fits_has_no_problem() -> None:
    assert problems(prompt="one two three", max_tokens=13) == []
    assert problems(messages=[{"role": "user", "content": "hi"}], stop=["\n", "END"]) == []


def test_an_unknown_model_is_unknown_model_on_the_model_field() -> None:
    assert problems(prompt="x", model="nope") == [("args.model", UNKNOWN_MODEL)]


def test_a_client_path_that_is_not_allowed_is_model_path_not_allowed() -> None:
    assert problems(prompt="x", model_path="/etc") == [("args.model_path", MODEL_PATH_NOT_ALLOWED)]


def test_prompt_plus_max_tokens_beyond_the_context_is_context_length_exceeded() -> None:
    assert problems(prompt="one two three", max_tokens=14) == [
        ("args.max_tokens", CONTEXT_LENGTH_EXCEEDED)
    ]
    chat = [{"role": "user", "content": "a"}] * 7  # 14 tokens
    assert problems(messages=chat, max_tokens=3) == [("args.max_tokens", CONTEXT_LENGTH_EXCEEDED)]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", 101.0),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("seed", 2**53 + 1),
        ("checkpoint_every", -1),
        ("device", "tpu"),
        ("stop", ""),
        ("stop", [""]),
        ("stop", [1]),
        ("stop", ["x"] * 17),
        ("stop", ["x" * 257]),
    ],
)
def test_parameters_out_of_range_are_refused_on_their_field(name: str, value: Any) -> None:
    assert (f"args.{name}", "INVALID_ARGUMENTS") in problems(prompt="x", **{name: value})


def test_exactly_one_of_prompt_and_messages_is_needed() -> None:
    assert problems() == [("args.prompt", "INVALID_ARGUMENTS")]
    both = problems(prompt="x", messages=[{"role": "user", "content": "y"}])
    assert both == [("args.prompt", "INVALID_ARGUMENTS")]


def test_malformed_messages_name_the_message_at_fault() -> None:
    assert problems(messages=[]) == [("args.messages", "INVALID_ARGUMENTS")]
    assert problems(messages=[{"role": "robot", "content": "x"}]) == [
        ("args.messages[0].role", "INVALID_ARGUMENTS")
    ]
    assert problems(messages=[{"role": "user"}]) == [("args.messages[0]", "INVALID_ARGUMENTS")]
    assert problems(messages=[{"role": "user", "content": 3}]) == [
        ("args.messages[0].content", "INVALID_ARGUMENTS")
    ]


def test_messages_to_a_model_without_a_chat_template_are_refused() -> None:
    chat = [{"role": "user", "content": "hi"}]
    assert problems(messages=chat, model="plain") == [("args.messages", "INVALID_ARGUMENTS")]


# --------------------------------------------------------------------------- through the registry
def refusal(args: dict[str, Any]) -> registry.ArgumentError:
    with pytest.raises(registry.ArgumentError) as caught:
        registry.validate_args("llm.generate", args)
    return caught.value


@pytest.fixture
def operator_settings(tmp_path: Path) -> Iterator[None]:
    before = registry.settings()
    registry.configure(llm_catalog.operator_settings({}, []))
    yield
    registry.configure(before)


def test_unknown_arguments_are_refused_by_the_signature(operator_settings: None) -> None:
    error = refusal({"prompt": "x", "temprature": 0.5})
    assert error.reason == "INVALID_ARGUMENTS"
    assert [v.field for v in error.violations] == ["args"]
    assert "temprature" in str(error)


def test_the_built_in_model_counts_bytes_against_its_2048_positions(
    operator_settings: None,
) -> None:
    registry.validate_args("llm.generate", {"prompt": "x" * 1983, "max_tokens": 64})
    error = refusal({"prompt": "x" * 1984, "max_tokens": 64})
    assert error.reason == CONTEXT_LENGTH_EXCEEDED
    assert "1985 tokens" in str(error) and "2048-token context" in str(error)
    assert refusal({"prompt": "x", "max_tokens": 100_000}).reason == CONTEXT_LENGTH_EXCEEDED


def test_an_unknown_model_names_the_models_there_are(operator_settings: None) -> None:
    error = refusal({"prompt": "x", "model": "gpt-9"})
    assert error.reason == UNKNOWN_MODEL
    assert "tiny" in str(error)


def test_client_paths_are_off_unless_the_operator_allows_a_directory(
    operator_settings: None, tmp_path: Path
) -> None:
    assert refusal({"prompt": "x", "model_path": str(tmp_path)}).reason == MODEL_PATH_NOT_ALLOWED
    registry.configure(llm_catalog.operator_settings({}, [str(tmp_path / "allowed")]))
    (tmp_path / "allowed").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "elsewhere")
    escape = refusal({"prompt": "x", "model_path": str(tmp_path / "allowed" / "escape")})
    assert escape.reason == MODEL_PATH_NOT_ALLOWED  # symlinks are followed before the check
    empty = refusal({"prompt": "x", "model_path": str(tmp_path / "allowed")})
    assert empty.reason == "INVALID_ARGUMENTS" and "config.json" in str(empty)
