"""LLM tasks: token-by-token generation that can be interrupted and resumed.

Registered names:

- ``llm.generate``: autoregressive generation with a KV cache on the engine's GPU (or
  CPU), streaming one chunk per token, checkpointing every few tokens, resumable.
- ``llm.stuck_cuda``: one long GPU kernel (a long C call without CUDA) that no SIGINT
  can end; it exists to show that the escalation ladder needs SIGKILL.
- ``llm.hold_memory``: holds a task-local buffer while it sleeps; interrupting it shows
  whether the runtime gives an interrupted task's memory back.

torch is imported inside the task functions only: the controller imports this module to
know the task names and must not pay for ``import torch``. The model itself (tokenizer,
transformer, KV cache, seeded sampling) lives in ``tether_server.tasks.llm_model``.

Interrupts and resumption in ``llm.generate``
---------------------------------------------
Each decode step (choose a token, emit it, feed it to the model) runs inside
``ctx.uninterruptible()``, so a SIGINT never tears a step: the step finishes, a
checkpoint is written, and the task ends with ``KeyboardInterrupt`` (INTERRUPTED).
Periodic checkpoints (every ``checkpoint_every`` tokens) cover the harsher stages of the
ladder, where no Python runs after the signal.

A checkpoint is ``{"version": 1, "prompt", "seed", "temperature", "model",
"generated_ids", "text"}``. An attempt started with ``ctx.resume_state`` must have the
same prompt, seed, temperature and model (else ``ValueError``); ``max_tokens`` may
differ. It emits the text generated so far as ONE chunk up front, rebuilds the KV cache,
then emits one chunk per new token: the resumed task's output, like its result's
``text``, is the full text, the text of an uninterrupted run. Two things make it so:

- sampling draws from a generator seeded by (seed, step), never from a running RNG;
- the KV cache is rebuilt as the first attempt built it (one prefill of the prompt,
  then one decode step per generated token), so every logit is bit for bit the same on
  the same device. One prefill of prompt + generated ids would be much faster, but other
  kernel shapes round differently: measured on an H200 in bf16, a sampled continuation
  then left the uninterrupted text within 30-70 tokens. The price is one decode step per
  recovered token, about what generating them cost, without the streaming.

Chunks: one ``ctx.emit`` per token, except that a token ending inside a multi-byte UTF-8
character emits nothing; the token that completes the character emits all of it. No
chunk is ever empty and no character is ever split between chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from tether_server.runtime.registry import task

if TYPE_CHECKING:
    import torch

    from tether_server.tasks.llm_model import LanguageModel

CHECKPOINT_VERSION = 1
PROGRESS_EVERY = 4  # tokens between two progress reports
MAX_STUCK_SECONDS = 3600.0


class LLMTaskContext(Protocol):
    """The part of the runtime's ``TaskContext`` that these tasks use."""

    @property
    def interrupted(self) -> bool: ...

    @property
    def resume_state(self) -> Any: ...

    def emit(self, chunk: str) -> None: ...

    def progress(self, fraction: float, message: str = "") -> None: ...

    def checkpoint(self, state: Any) -> None: ...

    def check(self) -> None: ...

    def uninterruptible(self) -> AbstractContextManager[Any]: ...


@task("llm.generate")
def generate(
    ctx: LLMTaskContext,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    model: str = "tiny",
    model_path: str = "",
    device: str = "auto",
    checkpoint_every: int = 8,
) -> dict[str, Any]:
    """Generate up to ``max_tokens`` byte tokens after ``prompt``.

    ``temperature`` 0 is greedy; above 0, tokens are drawn with ``seed``. ``model`` names
    a built-in size (``tiny``, ``small``, ``large``, ``xl``: seeded random weights);
    ``model_path`` instead loads local weights (a directory with ``config.json`` and
    ``model.pt``, written by ``llm_model.save_model``). ``device`` is ``auto`` (CUDA when
    the engine has it), ``cpu`` or ``cuda``. ``checkpoint_every`` 0 checkpoints only on
    interrupt.

    Returns ``{"text", "tokens", "finish_reason": "length"|"stop", "device", "model"}``;
    ``tokens`` counts every generated token, those of a resumed attempt included.
    """
    from tether_server.tasks import llm_model

    _validate_generate_args(max_tokens, temperature, checkpoint_every)
    lm = llm_model.get_model(model, model_path, llm_model.resolve_device(device))
    prompt_ids = [llm_model.BOS_ID, *llm_model.ByteTokenizer.encode(prompt)]
    if len(prompt_ids) + max_tokens > lm.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids) - 1} bytes) + max_tokens ({max_tokens}) exceed the "
            f"{lm.config.max_seq_len} positions of model {lm.config.name!r}"
        )
    generated = _resumed_ids(ctx.resume_state, prompt, seed, temperature, lm.config.name)
    del generated[max_tokens:]
    text, finish_reason = _decode_loop(
        ctx, lm, prompt, prompt_ids, generated, max_tokens, temperature, seed, checkpoint_every
    )
    return {
        "text": text,
        "tokens": len(generated),
        "finish_reason": finish_reason,
        "device": lm.device.type,
        "model": lm.config.name,
    }


def _validate_generate_args(max_tokens: int, temperature: float, checkpoint_every: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0.0 <= temperature <= 100.0:
        raise ValueError(f"temperature must be in [0, 100], got {temperature}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be 0 or more, got {checkpoint_every}")


def _resumed_ids(state: Any, prompt: str, seed: int, temperature: float, model: str) -> list[int]:
    """The token ids a previous attempt generated, after checking they belong to this task.

    Ids may come back as integral floats (JSON through ``google.protobuf.Struct``).
    """
    if state is None:
        return []
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError("resume_state is not an llm.generate checkpoint of version 1")
    expected = {"prompt": prompt, "seed": seed, "temperature": temperature, "model": model}
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"resume_state belongs to another generation: its {key} is "
                f"{state.get(key)!r}, this task's is {value!r}"
            )
    ids = state.get("generated_ids")
    if not isinstance(ids, list) or not all(_is_byte_id(i) for i in ids):
        raise ValueError("resume_state generated_ids must be a list of byte ids (0-255)")
    return [int(i) for i in ids]


def _is_byte_id(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(value).is_integer() and 0 <= value < 256


def _decode_loop(
    ctx: LLMTaskContext,
    lm: LanguageModel,
    prompt: str,
    prompt_ids: list[int],
    generated: list[int],
    max_tokens: int,
    temperature: float,
    seed: int,
    checkpoint_every: int,
) -> tuple[str, str]:
    """Extend ``generated`` in place; the full text and the finish reason."""
    from tether_server.tasks import llm_model

    decoder = llm_model.StreamDecoder()
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            ctx.emit(piece)

    def save_checkpoint() -> None:
        ctx.checkpoint(
            {
                "version": CHECKPOINT_VERSION,
                "prompt": prompt,
                "seed": seed,
                "temperature": temperature,
                "model": lm.config.name,
                "generated_ids": list(generated),
                "text": "".join(pieces),
            }
        )

    if generated:  # a resumed attempt: the old text as one chunk
        emit(decoder.push(generated))
    finish_reason = "length"
    if len(generated) >= max_tokens:
        emit(decoder.flush())
        return "".join(pieces), finish_reason
    cache = lm.new_cache(len(prompt_ids) + max_tokens)
    logits: torch.Tensor | None = None
    try:
        logits = lm.prefill(prompt_ids, cache)
        if generated:
            ctx.progress(0.0, f"resuming: replaying {len(generated)} generated tokens")
            # One decode step per token, exactly as the first attempt computed them: one
            # prefill of prompt + generated ids would be faster but not bit-identical (other
            # kernel shapes), and in bf16 the continuation then drifts within tens of tokens.
            for token in generated:
                logits = lm.decode(token, cache)
            ctx.progress(len(generated) / max_tokens, f"resumed at token {len(generated)}")
        for step in range(len(generated), max_tokens):
            with ctx.uninterruptible():
                token = llm_model.choose_token(logits, temperature, seed, step)
                if token == llm_model.EOS_ID:
                    finish_reason = "stop"
                    break
                generated.append(token)
                emit(decoder.push([token]))
                count = len(generated)
                if count % PROGRESS_EVERY == 0 or count == max_tokens:
                    ctx.progress(count / max_tokens, f"token {count}/{max_tokens}")
                periodic = checkpoint_every > 0 and count % checkpoint_every == 0
                if periodic or ctx.interrupted:
                    save_checkpoint()
                if count < max_tokens and not ctx.interrupted:
                    logits = lm.decode(token, cache)
            # uninterruptible() raises on exit when interrupted; check() covers a
            # context that only records the flag.
            if ctx.interrupted:
                ctx.check()
        emit(decoder.flush())
    finally:
        # Give the KV cache back now, even when interrupted: the runtime's cleanup then
        # has nothing of ours to find in this frame.
        cache.release()
        del logits
    return "".join(pieces), finish_reason


@task("llm.stuck_cuda")
def stuck_cuda(ctx: LLMTaskContext, seconds: float, device: str = "auto") -> dict[str, Any]:
    """Occupy the engine for ``seconds`` in ONE call that cannot return early.

    With CUDA: one spin kernel (``torch.cuda._sleep``) calibrated to ``seconds``, then
    ``torch.cuda.synchronize()``: the host thread waits in C, so SIGINT waits too and
    SIGTERM's exception with it; only SIGKILL ends it. Without CUDA: one
    ``hashlib.pbkdf2_hmac`` call calibrated the same way, a C call that Python's signal
    handlers wait for as well. ``device`` is ``auto``, ``cpu`` or ``cuda``.
    """
    import torch

    from tether_server.tasks import llm_model

    if not 0.0 < seconds <= MAX_STUCK_SECONDS:
        raise ValueError(f"seconds must be in (0, {MAX_STUCK_SECONDS:g}], got {seconds}")
    target = llm_model.resolve_device(device)
    if target.type == "cuda":
        spin: Callable[[int], None] = torch.cuda._sleep  # untyped in torch's stubs
        cycles = int(seconds * _gpu_cycles_per_second(spin))
        ctx.progress(0.0, f"one GPU kernel of {seconds:g} s; only SIGKILL ends it")
        started = time.perf_counter()
        spin(cycles)
        torch.cuda.synchronize()
    else:
        iterations = max(1, int(seconds * _pbkdf2_iterations_per_second()))
        ctx.progress(0.0, f"one C call of {seconds:g} s; only SIGKILL ends it")
        started = time.perf_counter()
        _pbkdf2(iterations)
    return {"device": target.type, "seconds": time.perf_counter() - started}


def _gpu_cycles_per_second(spin: Callable[[int], None]) -> float:
    import torch

    spin(1_000)  # the first launch loads the kernel
    torch.cuda.synchronize()
    cycles = 100_000_000  # ~50 ms at 2 GHz: long enough to hide the launch latency
    started = time.perf_counter()
    spin(cycles)
    torch.cuda.synchronize()
    return cycles / (time.perf_counter() - started)


def _pbkdf2(iterations: int) -> None:
    import hashlib

    hashlib.pbkdf2_hmac("sha256", b"tether", b"stuck-task", iterations)


def _pbkdf2_iterations_per_second() -> float:
    iterations = 20_000
    started = time.perf_counter()
    _pbkdf2(iterations)
    return iterations / max(time.perf_counter() - started, 1e-6)


@task("llm.hold_memory")
def hold_memory(
    ctx: LLMTaskContext, mb: int, seconds: float, device: str = "auto"
) -> dict[str, Any]:
    """Hold a ``mb`` MiB buffer for ``seconds``, then free it.

    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Interrupted, it deliberately does NOT free the buffer: the frames of the interrupted
    call keep it alive, as they would for any task, and the runtime must give it back.
    """
    import torch

    from tether_server.tasks import llm_model

    if mb < 1:
        raise ValueError(f"mb must be at least 1, got {mb}")
    if seconds < 0:
        raise ValueError(f"seconds must be 0 or more, got {seconds}")
    target = llm_model.resolve_device(device)
    # ones, not empty: every page is touched, so RSS (or GPU memory) really holds it.
    buffer = torch.ones(mb * 2**20, dtype=torch.uint8, device=target)
    ctx.progress(0.0, f"holding {mb} MiB on {target.type}")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.25))
        ctx.check()
        ctx.progress(1.0 - max(left - 0.25, 0.0) / seconds, f"holding {mb} MiB on {target.type}")
    del buffer
    return {"mb": mb, "device": target.type, "seconds": seconds}
