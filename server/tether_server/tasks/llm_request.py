"""What makes an ``llm.generate`` request valid, checked before it is queued.

:func:`check` is pure: it takes the bound arguments and a *resolver* that describes the
model a request names (:class:`ModelView`: context length, chat template, how many
tokens a prompt makes), and returns every :class:`~tether_server.runtime.registry.Violation`
it finds. :func:`validate_generate` is the task's submit-time validator
(``@task("llm.generate", validator=...)``): it resolves models through the catalog and
the real tokenizers, so the controller refuses an unknown model, a path the operator did
not allow, a prompt that does not fit the context with ``max_tokens``, or sampling
parameters out of range with INVALID_ARGUMENT, and no such request reaches an engine.
The engine runs the same checks again (a direct call, a resumed attempt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..runtime.registry import ArgumentError, Violation
from . import llm_catalog

TASK: Final = "llm.generate"
ROLES: Final = ("system", "user", "assistant")
MAX_TEMPERATURE: Final = 100.0
MAX_STOP_SEQUENCES: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_SEED: Final = 2**53
"""Seeds travel as JSON numbers (doubles): larger integers would not arrive intact."""

UNKNOWN_MODEL: Final = "UNKNOWN_MODEL"
MODEL_PATH_NOT_ALLOWED: Final = "MODEL_PATH_NOT_ALLOWED"
CONTEXT_LENGTH_EXCEEDED: Final = "CONTEXT_LENGTH_EXCEEDED"

PromptCounter = Callable[[str | None, Sequence[Mapping[str, str]] | None], int]


@dataclass(frozen=True)
class ModelView:
    """What validation needs to know of a model."""

    name: str
    context_length: int
    chat: bool
    """It has a chat template (``messages`` are accepted)."""
    count_tokens: PromptCounter


Resolver = Callable[[str, str], ModelView]
"""(model, model_path) -> the model; raises LookupError, PermissionError or ValueError."""


def check(args: Mapping[str, Any], resolve: Resolver | None) -> list[Violation]:
    """Every problem of these (bound) ``llm.generate`` arguments.

    Without a resolver, only what needs no model is checked (the engine counts the
    prompt's tokens itself, with the model it loaded).
    """
    problems: list[Violation] = []
    view = _resolve(args, resolve, problems) if resolve is not None else None
    prompt, messages = args.get("prompt"), args.get("messages")
    prompt_ok = _check_prompt(prompt, messages, problems)
    max_tokens = int(args.get("max_tokens", 64))
    _check_ranges(args, max_tokens, problems)
    if view is not None and prompt_ok:
        if messages is not None and not view.chat:
            problems.append(
                Violation(
                    "args.messages", f"model {view.name!r} has no chat template: send a prompt"
                )
            )
        else:
            try:
                count = view.count_tokens(prompt, messages)
            except Exception as exc:  # a chat template may raise on odd conversations
                problems.append(Violation("args.messages", f"cannot render the chat: {exc}"))
            else:
                problems.extend(
                    context_violations(view.name, count, max_tokens, view.context_length)
                )
    return problems


def context_violations(
    model: str, prompt_tokens: int, max_tokens: int, context: int
) -> list[Violation]:
    """A violation when the prompt and ``max_tokens`` do not fit the model's context."""
    if context <= 0 or prompt_tokens + max_tokens <= context:
        return []
    return [
        Violation(
            "args.max_tokens",
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the "
            f"{context}-token context of model {model!r}",
            CONTEXT_LENGTH_EXCEEDED,
        )
    ]


def stop_sequences(stop: Any) -> tuple[str, ...]:
    """``stop`` as a tuple: a string is one sequence, None none (assumes it passed check)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(str(s) for s in stop)


def validate_generate(args: Mapping[str, Any]) -> None:
    """The submit-time validator of ``llm.generate`` (raises ArgumentError)."""
    problems = check(args, resolve_model)
    if problems:
        # ErrorInfo metadata: the first field at fault and the model asked for.
        model = str(args.get("model_path") or args.get("model", "tiny"))
        raise ArgumentError(TASK, problems, {"field": problems[0].field, "model": model})


def resolve_model(model: str, model_path: str) -> ModelView:
    """The catalog's model, with a token counter from its real tokenizer."""
    entry = llm_catalog.entry_for(model, model_path)
    if entry.kind != "hf":
        return ModelView(entry.name, entry.context_length, False, _count_bytes)
    from . import hf_text

    tokenizer = hf_text.load_tokenizer(entry.path)

    def count(prompt: str | None, messages: Sequence[Mapping[str, str]] | None) -> int:
        return len(hf_text.encode_request(tokenizer, prompt, messages))

    return ModelView(entry.name, entry.context_length, hf_text.has_chat_template(tokenizer), count)


def _count_bytes(prompt: str | None, messages: Sequence[Mapping[str, str]] | None) -> int:
    return 1 + len((prompt or "").encode("utf-8"))  # BOS, then one token per byte


# --------------------------------------------------------------------------- pieces
def _resolve(
    args: Mapping[str, Any], resolve: Resolver, problems: list[Violation]
) -> ModelView | None:
    model, model_path = str(args.get("model", "tiny")), str(args.get("model_path", "") or "")
    try:
        return resolve(model, model_path)
    except LookupError as exc:
        problems.append(Violation("args.model", message_of(exc), UNKNOWN_MODEL))
    except PermissionError as exc:
        problems.append(Violation("args.model_path", message_of(exc), MODEL_PATH_NOT_ALLOWED))
    except ValueError as exc:
        problems.append(Violation("args.model_path", message_of(exc)))
    return None


def message_of(exc: BaseException) -> str:
    # KeyError-like exceptions quote their message; LookupError's str does not.
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _check_prompt(prompt: Any, messages: Any, problems: list[Violation]) -> bool:
    if (prompt is None) == (messages is None):
        problems.append(Violation("args.prompt", "give exactly one of prompt or messages"))
        return False
    if messages is None:
        return True
    if not isinstance(messages, list) or not messages:
        problems.append(Violation("args.messages", "messages must be a non-empty list"))
        return False
    ok = True
    for index, message in enumerate(messages):
        field = f"args.messages[{index}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            problems.append(Violation(field, 'each message is {"role": ..., "content": ...}'))
            ok = False
        elif message["role"] not in ROLES:
            problems.append(Violation(f"{field}.role", f"role must be one of {', '.join(ROLES)}"))
            ok = False
        elif not isinstance(message["content"], str):
            problems.append(Violation(f"{field}.content", "content must be a string"))
            ok = False
    return ok


def _check_ranges(args: Mapping[str, Any], max_tokens: int, problems: list[Violation]) -> None:
    def bad(name: str, rule: str) -> None:
        problems.append(Violation(f"args.{name}", f"{name} must be {rule}, got {args.get(name)!r}"))

    if max_tokens < 1:
        bad("max_tokens", "at least 1")
    if not 0.0 <= float(args.get("temperature", 0.0)) <= MAX_TEMPERATURE:
        bad("temperature", f"in [0, {MAX_TEMPERATURE:g}]")
    if not 0.0 < float(args.get("top_p", 1.0)) <= 1.0:
        bad("top_p", "in (0, 1]")
    if int(args.get("top_k", 0)) < 0:
        bad("top_k", "0 (off) or more")
    if abs(int(args.get("seed", 0))) > MAX_SEED:
        bad("seed", "an integer within +-2**53")
    if int(args.get("checkpoint_every", 8)) < 0:
        bad("checkpoint_every", "0 (only on interrupt) or more")
    device = str(args.get("device", "auto"))
    if device not in ("auto", "cpu", "cuda") and not (
        device.startswith("cuda:") and device[5:].isdigit()
    ):
        bad("device", "auto, cpu, cuda or cuda:N")
    stop = args.get("stop")
    if stop is None or (isinstance(stop, str) and stop):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        bad("stop", "a non-empty string or a list of them")
    elif len(stop) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in stop):
        bad(
            "stop", f"at most {MAX_STOP_SEQUENCES} sequences of at most {MAX_STOP_CHARS} characters"
        )
