"""Hugging Face checkpoints behind ``llm.generate``: loading, the KV cache, the backend.

A checkpoint is a local directory (``config.json``, safetensors weights, tokenizer
files) that transformers loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
``local_files_only=True``: nothing is ever downloaded. Engines load the operator's
checkpoints once, at warm-up (``llm_model.warm_up``), and keep them in a per-process
cache keyed by (directory, device); the weights are declared resident
(``register_resident_probe``), so the runtime's leak check never counts them against a
task. On CUDA the weights are bf16; on a CPU float32 (bf16 matmuls are slow there).

:class:`HFModel` is the ``generation.Backend`` of such a checkpoint: one prefill of the
prompt, then one forward per token with a ``DynamicCache``, logits of the last position
only (``logits_to_keep=1``), in float32 for sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from ..runtime.resources import register_resident_probe
from . import hf_text
from .detokenize import IncrementalDetokenizer
from .llm_model import CUDA_ATTENTION, module_bytes

_MODELS: dict[tuple[str, str], HFModel] = {}


class HFCache:
    """A transformers ``DynamicCache``; ``release`` drops its tensors now."""

    def __init__(self, config: Any) -> None:
        from transformers import DynamicCache

        self.cache: Any = DynamicCache(config=config)

    def release(self) -> None:
        self.cache = None


@dataclass
class HFModel:
    """A loaded checkpoint on its device (the ``generation.Backend`` protocol)."""

    name: str
    path: str
    module: Any
    """The ``PreTrainedModel``."""
    tokenizer: hf_text.Tokenizer
    device: torch.device
    context_length: int
    eos_ids: frozenset[int]

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def vocab_size(self) -> int:
        return int(self.module.config.vocab_size)

    def encode(self, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]:
        return hf_text.encode_request(self.tokenizer, prompt, messages)

    def new_cache(self, capacity: int) -> HFCache:
        # A DynamicCache grows as it goes; capacity is checked at submit time.
        return HFCache(self.module.config)

    def prefill(self, ids: list[int], cache: HFCache) -> torch.Tensor:
        return self._forward(ids, cache)

    def decode(self, token: int, cache: HFCache) -> torch.Tensor:
        return self._forward([token], cache)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        # Logits past the tokenizer's vocabulary (padding rows of the embedding) are
        # never tokens: a random or padded model must not sample them.
        vocab = len(self.tokenizer)
        if logits.shape[0] <= vocab:
            return logits
        scores = logits.clone()
        scores[vocab:] = -float("inf")
        return scores

    def detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(lambda ids: hf_text.decode(self.tokenizer, ids), prompt_ids)

    def _forward(self, ids: list[int], cache: HFCache) -> torch.Tensor:
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode(), self._attention():
            out = self.module(input_ids=tensor, cache=cache.cache, use_cache=True, logits_to_keep=1)
            logits: torch.Tensor = out.logits[0, -1].float()
        del out
        return logits

    def _attention(self) -> AbstractContextManager[Any]:
        return sdpa_kernel(CUDA_ATTENTION) if self.device.type == "cuda" else nullcontext()


def load(name: str, path: str, device: torch.device) -> HFModel:
    """Load the checkpoint in ``path`` onto ``device`` (from local files only)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .llm_catalog import read_context_length

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tokenizer = hf_text.load_tokenizer(path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    module = module.to(device).eval().requires_grad_(False)
    generation = getattr(module, "generation_config", None)
    return HFModel(
        name=name,
        path=path,
        module=module,
        tokenizer=tokenizer,
        device=device,
        context_length=read_context_length(Path(path)),
        eos_ids=hf_text.eos_ids(tokenizer, getattr(generation, "eos_token_id", None)),
    )


def get_model(name: str, path: str, device: torch.device) -> HFModel:
    """The cached model of ``path`` on ``device``, loaded on first use."""
    key = (str(Path(path).resolve()), str(device))
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = load(name, path, device)
    return model


def cached_models() -> dict[tuple[str, str], HFModel]:
    return dict(_MODELS)


def clear_model_cache() -> None:
    _MODELS.clear()


def _resident_bytes() -> tuple[int, int]:
    """(host, GPU) bytes of loaded checkpoints: kept on purpose, not leaked."""
    return module_bytes(model.module for model in list(_MODELS.values()))


register_resident_probe(_resident_bytes)
