"""Make a real Hugging Face checkpoint with random weights, without any download.

A Llama-architecture ``LlamaForCausalLM`` built from a config (seeded random weights)
and a tokenizer trained here with the ``tokenizers`` library on a short text that holds
multi-byte characters, saved with ``save_pretrained``: the directory is what an operator
passes to ``--model NAME=PATH``. Tests, benchmarks and GPU checks use it where no real
checkpoint can be fetched::

    python -m tether_server.tasks.hf_random /tmp/llama-test --tokenizer metaspace

Two tokenizer styles cover the two ways vocabularies encode text:

- ``byte_bpe``: GPT-2 style byte-level BPE (``Ġ`` marks a space; characters outside the
  learned merges are split into bytes, so one character may span several tokens);
- ``metaspace``: SentencePiece/Llama style (``▁`` marks a space, the decoder strips the
  first one; byte fallback tokens ``<0x..>`` for characters the vocabulary lacks).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

TRAINING_TEXT: Final = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln, naïve café, Ça va? Ünïcödé everywhere.",
    "東京は晴れです。日本語のテキストも少し。",
    "Emoji too: 😀 🎉 🚀, and symbols — € £ ¥ ± ∞.",
    "Once upon a time, in a land far away, there lived a tokenizer.",
]
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIALS: Final = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class Shape:
    """Model size of a random checkpoint."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    context: int = 512
    vocab: int = 400


SHAPES: Final = {
    "test": Shape(context=4096),  # the test shape, with room for gpu_check's 2000 tokens
    # About 0.76 B parameters (1.5 GB in bf16): a real GPU load for bench/gpu_check.py.
    "1b": Shape(hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=5632, context=4096),
}


def build_tokenizer(style: str, vocab: int) -> Any:
    """A ``PreTrainedTokenizerFast`` of ``style`` trained on :data:`TRAINING_TEXT`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "byte_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif style == "metaspace":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}: byte_bpe or metaspace")
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    if style == "metaspace":
        tokenizer = _with_byte_fallback_tokens(tokenizer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer_class: Any = PreTrainedTokenizerFast  # untyped in transformers' stubs
    fast = tokenizer_class(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _with_byte_fallback_tokens(tokenizer: Any) -> Any:
    """Add ``<0x00>``..``<0xFF>`` as *ordinary* vocabulary entries, as Llama has them.

    (Declared as special tokens instead, a decode that skips special tokens would drop
    every byte-fallback character.)
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def build_checkpoint(
    directory: Path,
    *,
    style: str = "byte_bpe",
    shape: Shape | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-weights Llama checkpoint with a trained tokenizer into ``directory``.

    ``dtype`` is the weights' type on disk (``bfloat16`` halves a large checkpoint).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = shape or Shape()
    tokenizer = build_tokenizer(style, shape.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--tokenizer", default="byte_bpe", choices=["byte_bpe", "metaspace"])
    p.add_argument("--hidden", type=int, default=Shape.hidden)
    p.add_argument("--layers", type=int, default=Shape.layers)
    p.add_argument("--heads", type=int, default=Shape.heads)
    p.add_argument("--kv-heads", type=int, default=Shape.kv_heads)
    p.add_argument("--intermediate", type=int, default=Shape.intermediate)
    p.add_argument("--context", type=int, default=Shape.context)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES), help="a named shape (overrides the sizes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args(argv)
    shape = (
        SHAPES[a.shape]
        if a.shape
        else Shape(a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.context)
    )
    build_checkpoint(a.directory, style=a.tokenizer, shape=shape, seed=a.seed, dtype=a.dtype)
    print(f"wrote {a.directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
