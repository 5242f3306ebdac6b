"""The model behind ``llm.generate``: a small decoder-only transformer in plain torch.

Nothing here knows about tasks or contexts; ``tether_server.tasks.llm`` imports this
module lazily, inside its task functions, so that the controller can import the task
module (to validate task names) without paying for ``import torch``.

What is here:

- ``ByteTokenizer``: bytes are tokens (ids 0-255) plus a few specials (``BOS_ID``,
  ``EOS_ID``); ``StreamDecoder`` turns a token stream back into text without ever
  splitting a multi-byte UTF-8 character across two pieces.
- ``ModelConfig`` and the named sizes in ``MODEL_CONFIGS``; the network itself
  (``Transformer``, its ``KVCache`` and the seeded weight init) is in :mod:`.llm_network`;
  ``LanguageModel`` wraps a built one as a ``generation`` backend.
- Weights are *random*, drawn from a generator seeded by ``ModelConfig.weights_seed``
  directly on the target device, so building even a multi-GiB model takes a moment and
  needs no download. Operators with real weights for this architecture pass a directory
  holding ``config.json`` and ``model.pt`` (see ``save_model`` / ``load_model``).
- ``get_model`` keeps built models in a per-process cache keyed by (model, device), as a
  serving engine keeps its weights between requests.
- ``choose_token``: greedy at temperature 0, otherwise sampling from a generator whose
  seed is derived from (seed, step), so a resumed generation draws exactly what an
  uninterrupted one would have drawn at the same step.
"""

from __future__ import annotations

import codecs
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..runtime.resources import register_resident_probe
from .llm_catalog import (
    BOS_ID,
    BYTE_VOCAB,
    DEMO_CONFIG_FILE,
    DEMO_WEIGHTS_FILE,
    EOS_ID,
    MODEL_CONFIGS,
    VOCAB_SIZE,
    ModelConfig,
)
from .llm_network import KVCache, Transformer, init_weights
from .sampling import choose_token as _choose
from .sampling import step_seed

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB",
    "EOS_ID",
    "MODEL_CONFIGS",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "StreamDecoder",
    "build_model",
    "choose_token",
    "get_model",
    "load_model",
    "resolve_device",
    "save_model",
    "step_seed",
    "warm_up",
]

# Attention kernels for CUDA. cuDNN attention is left out: it builds an execution plan
# for every new sequence length, and a decode step is a new length every time (measured
# on an H200, torch 2.11: 53-85 ms per token on unseen lengths, 2-12 ms without cuDNN).
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

CONFIG_FILE = DEMO_CONFIG_FILE
WEIGHTS_FILE = DEMO_WEIGHTS_FILE


class ByteTokenizer:
    """UTF-8 bytes as tokens. A prompt is ``[BOS] + bytes``; ``EOS`` ends a generation."""

    @staticmethod
    def encode(text: str) -> list[int]:
        """The byte ids of ``text`` (no specials)."""
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(ids: list[int]) -> str:
        """Text of byte ids; specials are skipped and invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns token ids into text pieces one token at a time.

    A token that ends in the middle of a multi-byte character yields ``""``; the token
    that completes it yields the whole character. The concatenation of every piece plus
    ``flush()`` equals ``ByteTokenizer.decode`` of all the ids.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        """The text completed by these ids (specials are skipped)."""
        return self._decoder.decode(bytes(i for i in ids if i < BYTE_VOCAB))

    def flush(self) -> str:
        """What is left at the end: U+FFFD for a trailing incomplete character, else ``""``."""
        return self._decoder.decode(b"", final=True)


@dataclass
class LanguageModel:
    """A built model on its device, with the helpers a decode loop needs."""

    config: ModelConfig
    module: Transformer
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.tok_emb.weight.dtype

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.device, self.dtype)

    def _forward(self, ids: list[int], cache: KVCache | None) -> torch.Tensor:
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            if self.device.type != "cuda":
                logits: torch.Tensor = self.module(tensor, cache)
                return logits
            with sdpa_kernel(CUDA_ATTENTION):
                logits = self.module(tensor, cache)
                return logits

    def prefill(self, ids: list[int], cache: KVCache) -> torch.Tensor:
        """Feed ``ids`` into ``cache`` at once; the logits ``[vocab]`` after the last one."""
        return self._forward(ids, cache)[0, -1]

    def decode(self, token: int, cache: KVCache) -> torch.Tensor:
        """Feed one token into ``cache``; the logits ``[vocab]`` for the next position."""
        return self._forward([token], cache)[0, -1]

    def full_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits ``[len, vocab]`` of a full forward without a cache (the reference)."""
        return self._forward(ids, None)[0]

    # The generation.Backend protocol.
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def vocab_size(self) -> int:
        """Generated ids are bytes: EOS ends a generation and is never kept."""
        return BYTE_VOCAB

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset({EOS_ID})

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return byte_scores(logits)

    def detokenizer(self, prompt_ids: Sequence[int]) -> ByteDetokenizer:
        return ByteDetokenizer()

    def encode_prompt(self, prompt: str) -> list[int]:
        return [BOS_ID, *ByteTokenizer.encode(prompt)]


class ByteDetokenizer:
    """``StreamDecoder`` one token at a time (the generation.Detokenizer protocol)."""

    def __init__(self) -> None:
        self._decoder = StreamDecoder()

    def push(self, token: int) -> str:
        return self._decoder.push([token])

    def flush(self) -> str:
        return self._decoder.flush()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but this engine has no CUDA device")
    return resolved


def _dtype_for(device: torch.device) -> torch.dtype:
    # bf16 on GPUs (fp16 could overflow the residual stream of random weights); fp32 on
    # CPU, where bf16 matmuls are slow.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(config: ModelConfig, device: torch.device) -> LanguageModel:
    """A model with seeded random weights, created directly on ``device``."""
    module = Transformer(config, device, _dtype_for(device))
    init_weights(module, config.weights_seed)
    module.eval().requires_grad_(False)
    return LanguageModel(config, module, device)


def save_model(model: LanguageModel, directory: Path) -> None:
    """Write ``config.json`` and ``model.pt`` (a state dict) for ``load_model``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(model.config.to_json())
    torch.save(model.module.state_dict(), directory / WEIGHTS_FILE)


def load_model(path: Path, device: torch.device) -> LanguageModel:
    """Load weights saved from this architecture.

    ``path`` is a directory holding ``config.json`` and ``model.pt``, or the state-dict
    file itself with ``config.json`` beside it.
    """
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    config_file = weights.parent / CONFIG_FILE
    if not weights.is_file() or not config_file.is_file():
        raise ValueError(f"model_path {str(path)!r} needs {WEIGHTS_FILE} and {CONFIG_FILE}")
    config = ModelConfig.from_json(config_file.read_text())
    module = Transformer(config, device, _dtype_for(device))
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    module.load_state_dict(state, strict=True)  # copies, casting to this device's dtype
    module.eval().requires_grad_(False)
    return LanguageModel(config, module, device)


_MODELS: dict[tuple[str, str], LanguageModel] = {}


def get_model(name: str, model_path: str, device: torch.device) -> LanguageModel:
    """The cached model for (name or path, device), built or loaded on first use."""
    if model_path:
        key = ("path:" + str(Path(model_path).resolve()), str(device))
    elif name in MODEL_CONFIGS:
        key = (name, str(device))
    else:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_CONFIGS)}")
    model = _MODELS.get(key)
    if model is None:
        if model_path:
            model = load_model(Path(model_path), device)
        else:
            model = build_model(MODEL_CONFIGS[name], device)
        _MODELS[key] = model
    return model


def cached_models() -> dict[tuple[str, str], LanguageModel]:
    """A copy of the model cache, e.g. for reporting what an engine keeps loaded."""
    return dict(_MODELS)


def module_bytes(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(host, GPU) bytes of these modules' parameters and buffers.

    The resident probes call this before and after every task, so each module's size is
    computed once and remembered while the module lives (a cached model's weights keep
    their size and device; walking a big model's tensors costs milliseconds).
    """
    host = gpu = 0
    for module in modules:
        cached = _MODULE_BYTES.get(id(module))
        if cached is None or cached[0]() is not module:
            cached = _MODULE_BYTES[id(module)] = (weakref.ref(module), *_tensor_bytes(module))
        host += cached[1]
        gpu += cached[2]
    for key in [key for key, entry in _MODULE_BYTES.items() if entry[0]() is None]:
        del _MODULE_BYTES[key]  # freed modules
    return host, gpu


_MODULE_BYTES: dict[int, tuple[weakref.ref[nn.Module], int, int]] = {}
"""Sizes by module id; the weak reference tells a live module from a reused id."""


def _tensor_bytes(module: nn.Module) -> tuple[int, int]:
    host = gpu = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type == "cuda":
            gpu += size
        else:
            host += size
    return host, gpu


def _resident_bytes() -> tuple[int, int]:
    """(host, GPU) bytes of cached model weights: kept on purpose, not leaked."""
    return module_bytes(model.module for model in list(_MODELS.values()))


register_resident_probe(_resident_bytes)


def warm_up() -> None:
    """Initialise torch on the engine's default device before the first task.

    The first CUDA call creates a context (about 0.5 GiB of host memory, measured on an
    H200) and the first matmul loads kernels; done inside a task, that memory would count
    as the task's and an interrupt would recycle the engine. A tiny model runs a few
    tokens here instead (it stays cached: a few MiB).

    Then every checkpoint the operator configured (``--model``) is loaded on the
    engine's default device and generates two tokens: a serving engine pays for its
    weights once, at start, and they are declared resident from then on.
    """
    from ..runtime.context import TaskContext
    from .llm import generate
    from .llm_catalog import configured_models

    def quiet() -> TaskContext:
        return TaskContext("warm-up", 0, sink=lambda _data: None)

    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        generate(quiet(), prompt="warm up", max_tokens=4, device=device, checkpoint_every=0)
    for name in configured_models():
        generate(quiet(), prompt="warm up", max_tokens=2, model=name, checkpoint_every=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clear_model_cache() -> None:
    """Forget every cached model (their memory goes when the last reference does)."""
    _MODELS.clear()


def choose_token(logits: torch.Tensor, temperature: float, seed: int, step: int) -> int:
    """The next byte token (or EOS) of the built-in model: argmax at temperature 0, else a
    seeded draw (see :mod:`.sampling`)."""
    return _choose(byte_scores(logits), temperature, seed, step)


def byte_scores(logits: torch.Tensor) -> torch.Tensor:
    """Only bytes and ``EOS`` can be chosen (BOS and the reserved ids never)."""
    scores = logits.detach().to("cpu", torch.float32)[: EOS_ID + 1].clone()
    scores[BOS_ID] = -math.inf
    return scores
