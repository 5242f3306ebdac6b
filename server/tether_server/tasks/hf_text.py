"""Text side of a Hugging Face checkpoint: its tokenizer, prompts and chat templates.

One function turns a request's ``prompt`` or chat ``messages`` into token ids,
:func:`encode_request`, and both the controller (to count a prompt's tokens against the
model's context at submit time) and the engine (to generate) call it with a tokenizer
loaded from the same files by :func:`load_tokenizer`. So the count the controller
validated is the count the engine prefills.

transformers is imported on first use only; importing it imports torch (about 2 s and
300 MB here), which a server pays once at start when ``--model`` is given and not at all
otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast


class Tokenizer(Protocol):
    """The part of a transformers tokenizer used here."""

    chat_template: Any
    eos_token_id: Any

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str: ...

    def apply_chat_template(
        self, conversation: Any, *, add_generation_prompt: bool, tokenize: bool
    ) -> Any: ...

    def __len__(self) -> int: ...


@functools.lru_cache(maxsize=32)
def load_tokenizer(path: str) -> Tokenizer:
    """The checkpoint's tokenizer, from its files only (``local_files_only``), cached per path."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return cast(Tokenizer, tokenizer)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_request(
    tokenizer: Tokenizer, prompt: str | None, messages: Sequence[Mapping[str, str]] | None
) -> list[int]:
    """Token ids to prefill: ``prompt`` with the tokenizer's special tokens (its BOS), or
    ``messages`` rendered by the chat template with the assistant's turn opened.

    The rendered chat text already holds the template's special tokens, so it is
    encoded without adding more (a second BOS would shift every position).
    """
    if messages is not None:
        if not has_chat_template(tokenizer):
            raise ValueError("this model's tokenizer has no chat template: send a prompt")
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(str(text), add_special_tokens=False))
    return list(tokenizer.encode(prompt or "", add_special_tokens=True))


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Text of ``ids`` as a stream shows it: special tokens dropped, and no clean-up of
    spaces (clean-up rewrites " ." as ".", which would make a text depend on where a
    stream cut it)."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def eos_ids(tokenizer: Tokenizer, generation_eos: Any) -> frozenset[int]:
    """End-of-sequence ids: the generation config's (an int or a list) and the tokenizer's."""
    found: set[int] = set()
    for value in (generation_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(v for v in value if isinstance(v, int))
    return frozenset(found)
