"""Which models ``llm.generate`` can run: the built-in demo sizes and the operator's checkpoints.

Both sides read this module: the controller (to validate a request at submit time and to
list the models in ``GetCluster``) and the engines (to load the checkpoints at warm-up).
It imports neither torch nor transformers; the tokenizers it needs for validation are
loaded through :mod:`.hf_text`, on first use or by :func:`prepare` at server start.

Operator settings travel through the task registry (``registry.configure``), under
:data:`SETTINGS_KEY`::

    {"llm": {"models": {"NAME": "/abs/path"}, "model_path_roots": ["/abs/dir", ...]}}

``models`` come from ``--model NAME=PATH`` (or ``--models-file``); ``model_path_roots``
from ``--allow-model-path DIR``: a client's ``model_path`` is refused unless it resolves
(symlinks followed) inside one of these directories. Without the flag, no client can
make an engine read a path of its choosing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from ..runtime import registry

SETTINGS_KEY: Final = "llm"

BYTE_VOCAB: Final = 256
BOS_ID: Final = 256
EOS_ID: Final = 257
# 256 bytes and the specials, padded to a multiple of 8; ids 258-263 are reserved and
# never sampled.
VOCAB_SIZE: Final = 264

DEMO_CONFIG_FILE: Final = "config.json"
DEMO_WEIGHTS_FILE: Final = "model.pt"
"""A directory with these two files holds weights of the built-in architecture."""

HF_CONFIG_FILE: Final = "config.json"
_CONTEXT_KEYS: Final = ("max_position_embeddings", "n_positions", "max_sequence_length")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a built-in (demo) model. Saved as ``config.json`` beside a state dict."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    vocab_size: int = VOCAB_SIZE
    weights_seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {VOCAB_SIZE}")

    @property
    def parameter_count(self) -> int:
        """Number of parameters (the LM head is the token embedding, so it is not counted twice)."""
        d, f = self.d_model, self.d_ff
        per_layer = 4 * d * d + 2 * d * f + 2 * d  # qkv + out, MLP in + out, two norms
        embeddings = (self.vocab_size + self.max_seq_len) * d
        return embeddings + self.n_layers * per_layer + d + self.vocab_size  # final norm, bias

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("model config must be a JSON object")
        return cls(**fields)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # ~1 ms per token on one CPU core: for tests and demos.
    "tiny": ModelConfig("tiny", d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=2048),
    # ~10 ms per token on one CPU core.
    "small": ModelConfig("small", d_model=512, n_layers=8, n_heads=8, d_ff=2048, max_seq_len=2048),
    # ~4.9 B parameters, ~9 GiB in bf16, ~8 ms per token on an H200: a real GPU load.
    "large": ModelConfig(
        "large", d_model=4096, n_layers=24, n_heads=32, d_ff=16384, max_seq_len=4096
    ),
    # ~18 B parameters, ~34 GiB in bf16, ~13 ms per token on an H200; fits one H100.
    "xl": ModelConfig("xl", d_model=6144, n_layers=40, n_heads=48, d_ff=24576, max_seq_len=4096),
}


@dataclass(frozen=True)
class ModelEntry:
    """A model a request can name: built-in, operator-configured, or a client's path."""

    name: str
    """What results and checkpoints call it (the path itself for a client's path)."""
    kind: str
    """``builtin`` (the demo byte transformer), ``hf`` (a Hugging Face checkpoint) or
    ``demo_path`` (weights of the built-in architecture in a directory)."""
    path: str = ""
    context_length: int = 0


# --------------------------------------------------------------------------- settings
def operator_settings(
    models: Mapping[str, str], model_path_roots: Sequence[str] = ()
) -> dict[str, Any]:
    """The registry settings for these operator flags; paths made absolute."""
    return {
        SETTINGS_KEY: {
            "models": {
                name: str(Path(path).expanduser().resolve()) for name, path in models.items()
            },
            "model_path_roots": [
                str(Path(root).expanduser().resolve()) for root in model_path_roots
            ],
        }
    }


def _settings() -> dict[str, Any]:
    value = registry.settings().get(SETTINGS_KEY)
    return value if isinstance(value, dict) else {}


def configured_models() -> dict[str, str]:
    """The operator's checkpoints: name -> absolute directory."""
    models = _settings().get("models")
    return {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {}


def model_path_roots() -> list[str]:
    roots = _settings().get("model_path_roots")
    return [str(r) for r in roots] if isinstance(roots, list) else []


# --------------------------------------------------------------------------- lookup
def builtin_entry(name: str) -> ModelEntry:
    config = MODEL_CONFIGS[name]
    return ModelEntry(name, "builtin", "", config.max_seq_len)


def entry_for(model: str, model_path: str) -> ModelEntry:
    """The model a request names. Raises ``LookupError`` (unknown name) or
    ``PermissionError`` (a path outside ``--allow-model-path``) or ``ValueError``
    (a path that holds no model)."""
    if model_path:
        return _client_path_entry(model_path)
    configured = configured_models()
    if model in configured:
        path = configured[model]
        return ModelEntry(model, "hf", path, read_context_length(Path(path)))
    if model in MODEL_CONFIGS:
        return builtin_entry(model)
    known = ", ".join([*configured, *MODEL_CONFIGS])
    raise LookupError(f"unknown model {model!r}: choose one of {known}")


def all_entries() -> list[ModelEntry]:
    """Every model a client can name (configured first), e.g. for GetCluster."""
    entries = [
        ModelEntry(name, "hf", path, read_context_length(Path(path)))
        for name, path in configured_models().items()
    ]
    shadowed = {entry.name for entry in entries}  # a configured name wins over a built-in one
    return [*entries, *(builtin_entry(name) for name in MODEL_CONFIGS if name not in shadowed)]


def listed_models() -> list[tuple[ModelEntry, bool]]:
    """(model, has a chat template) for GetCluster; empty where llm.generate is not loaded."""
    if "llm.generate" not in registry.names():
        return []
    listed = []
    for entry in all_entries():
        chat = False
        if entry.kind == "hf":
            from . import hf_text

            chat = hf_text.has_chat_template(hf_text.load_tokenizer(entry.path))
        listed.append((entry, chat))
    return listed


def _client_path_entry(model_path: str) -> ModelEntry:
    roots = model_path_roots()
    if not roots:
        raise PermissionError(
            "model_path is disabled on this server: name a model the operator configured "
            "(GetCluster lists them)"
        )
    resolved = Path(os.path.realpath(Path(model_path).expanduser()))
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PermissionError(
            f"model_path {model_path!r} is outside the directories this server allows "
            "(--allow-model-path)"
        )
    if (resolved / DEMO_WEIGHTS_FILE).is_file() and (resolved / DEMO_CONFIG_FILE).is_file():
        config = ModelConfig.from_json((resolved / DEMO_CONFIG_FILE).read_text())
        return ModelEntry(str(resolved), "demo_path", str(resolved), config.max_seq_len)
    if not (resolved / HF_CONFIG_FILE).is_file():
        raise ValueError(f"model_path {model_path!r} holds no {HF_CONFIG_FILE}")
    return ModelEntry(str(resolved), "hf", str(resolved), read_context_length(resolved))


def read_context_length(directory: Path) -> int:
    """The context length a Hugging Face ``config.json`` declares (0 when it says none)."""
    try:
        config = json.loads((directory / HF_CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {directory / HF_CONFIG_FILE}: {exc}") from None
    if isinstance(config.get("text_config"), dict):  # multimodal configs nest the LM's
        config = {**config, **config["text_config"]}
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def prepare() -> list[ModelEntry]:
    """Check every configured checkpoint and load its tokenizer (server start).

    Raises ``ValueError`` naming the model whose directory is unusable, so an operator's
    typo stops the server at start instead of failing every request.
    """
    from . import hf_text

    entries = []
    for name, path in configured_models().items():
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"--model {name}={path}: not a directory")
        try:
            length = read_context_length(directory)
        except ValueError as exc:
            raise ValueError(f"--model {name}={path}: {exc}") from None
        if length <= 0:
            raise ValueError(f"--model {name}={path}: config.json declares no context length")
        try:
            hf_text.load_tokenizer(path)
        except Exception as exc:
            raise ValueError(f"--model {name}={path}: cannot load its tokenizer: {exc}") from exc
        entries.append(ModelEntry(name, "hf", path, length))
    return entries
