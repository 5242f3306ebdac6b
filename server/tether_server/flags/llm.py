"""Flags of ``llm.generate``: the checkpoints it serves, the directories clients may name,
and the timeout policy of a generation that gives no timeout."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import LlmTimeoutPolicy
from .values import duration, name_and_path

__all__ = ["add_flags", "model_path_roots", "models", "timeout_policy"]

_LLM_TIMEOUT = LlmTimeoutPolicy()
"""Defaults of the --llm-timeout-* flags."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "models", "the checkpoints llm.generate serves and its timeout policy"
    )
    group.add_argument(
        "--model",
        action="append",
        default=[],
        dest="models",
        metavar="NAME=PATH",
        type=name_and_path,
        help="serve the Hugging Face checkpoint in directory PATH as llm.generate model NAME (repeatable; loaded on every engine at start)",
    )
    group.add_argument(
        "--models-file",
        type=Path,
        default=None,
        help='TOML file with a [models] table of NAME = "PATH" (relative paths: from the file), as --model',
    )
    group.add_argument(
        "--allow-model-path",
        action="append",
        default=[],
        dest="model_path_roots",
        metavar="DIR",
        help="let clients name a model directory (llm.generate model_path) inside DIR (repeatable; default: clients cannot name paths)",
    )
    group.add_argument(
        "--llm-timeout-base",
        type=duration,
        default=_LLM_TIMEOUT.base_seconds,
        help="policy timeout of an llm.generate that gives none: fixed part (default 30s)",
    )
    group.add_argument(
        "--llm-timeout-per-token",
        type=duration,
        default=_LLM_TIMEOUT.per_token_seconds,
        help="policy timeout of an llm.generate that gives none: per max_tokens (default 0.5s)",
    )
    group.add_argument(
        "--llm-timeout-per-prompt-char",
        type=duration,
        default=_LLM_TIMEOUT.per_prompt_char_seconds,
        help="policy timeout of an llm.generate that gives none: per prompt char (default 10ms)",
    )


def models(parser: argparse.ArgumentParser, a: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, absolute directory) of every --model and --models-file entry; names unique."""
    entries = list(a.models)
    if a.models_file is not None:
        try:
            entries += _models_file(a.models_file)
        except (OSError, ValueError) as exc:
            parser.error(f"--models-file {a.models_file}: {exc}")
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        parser.error("--model: a model name is given twice")
    return entries


def model_path_roots(a: argparse.Namespace) -> tuple[str, ...]:
    """The --allow-model-path directories, absolute."""
    return tuple(str(Path(r).expanduser().resolve()) for r in a.model_path_roots)


def timeout_policy(a: argparse.Namespace) -> LlmTimeoutPolicy:
    return LlmTimeoutPolicy(
        base_seconds=a.llm_timeout_base,
        per_token_seconds=a.llm_timeout_per_token,
        per_prompt_char_seconds=a.llm_timeout_per_prompt_char,
    )


def _models_file(path: Path) -> list[tuple[str, str]]:
    import tomllib

    table = tomllib.loads(path.read_text()).get("models")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError('needs a [models] table of NAME = "PATH"')
    base = path.expanduser().resolve().parent
    return [
        name_and_path(f"{name}={base / Path(value).expanduser()}") for name, value in table.items()
    ]
