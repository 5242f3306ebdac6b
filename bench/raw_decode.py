"""The baseline of LLM throughput: a checkpoint decoded with transformers alone, in process.

No tether code runs here: the checkpoint is loaded with ``AutoModelForCausalLM`` and
decoded greedily with a ``DynamicCache``, one forward per token, the token read back to
the host each step as any streaming loop must. B11 and ``bench/gpu_check.py`` compare
``llm.generate`` against it. Imports only torch and transformers (gpu_check runs without
the bench harness).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class RawLoop:
    """A checkpoint on ``device`` (bf16 on CUDA, float32 on a CPU) and its prompt's ids."""

    def __init__(self, path: Path, prompt: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.torch = torch
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.prompt: list[int] = list(tokenizer.encode(prompt))

    def tokens_per_second(self, tokens: int) -> float:
        """Prefill the prompt, then ``tokens`` greedy steps; tokens / the whole time."""
        from transformers import DynamicCache

        torch = self.torch
        started = time.perf_counter()
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([self.prompt], device=self.device)
            for _ in range(tokens):
                out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].float().argmax())
                ids = torch.tensor([[token]], device=self.device)
        return tokens / (time.perf_counter() - started)

    def close(self) -> None:
        """Drop the weights (on a GPU, before tether's engines need the memory)."""
        del self.model
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
