"""The decode loop behind ``llm.generate``, shared by the built-in model and HF checkpoints.

A *backend* (``llm_model`` for the demo transformer, ``hf`` for transformers checkpoints)
knows how to prefill and decode with a KV cache and how to turn ids into text; this
module does the rest, once for both: sampling, stop sequences, streaming, progress,
checkpoints, interrupts and resumption, timings.

Interrupts
----------
Each decode step (choose a token, stream it, feed it to the model) runs inside
``ctx.uninterruptible()``, so a SIGINT never tears a step: the step finishes, pending text
is sent, a checkpoint is written, and the task ends with ``KeyboardInterrupt``. The KV
cache is released in a ``finally`` before the exception leaves, so the runtime's
resource report, taken after the task, sees its memory back. Periodic checkpoints
(every ``checkpoint_every`` tokens) cover the harsher stages, where no Python runs.

Resumption
----------
A checkpoint is ``{"version": 2, "model", "request", "generated_ids", "text"}``;
``request`` holds what must match for the ids to mean the same thing (a hash of the
prompt ids, the sampling parameters, the stop sequences). A resumed attempt streams the
old text as one chunk, rebuilds the KV cache as the first attempt built it (one prefill
of the prompt, then one decode step per generated token: other kernel shapes round
differently, and a sampled continuation would drift), then goes on. Sampling draws from
(seed, step) generators, so the text is the uninterrupted run's, on the same device type.

Streaming
---------
Text pieces go out through a :class:`ChunkBatcher`: a piece is sent at once when the
last send is at least ``CHUNK_INTERVAL`` old, otherwise it waits for the next token (or
the end). A model slower than the interval streams one chunk per token; a faster one
sends one message every few milliseconds instead of one per token (each message costs
the controller an event, a store write and a fan-out). The chunks concatenate to the
result's ``text`` exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol

import torch

from .detokenize import StopMatcher
from .llm import LLMTaskContext
from .sampling import choose_token

CHECKPOINT_VERSION: Final = 2
CHUNK_INTERVAL: Final = 0.005
"""Seconds: a text piece waits at most this long (plus one step) for company."""
PROGRESS_INTERVAL: Final = 0.1
"""Seconds between two progress reports (and one at the end)."""


class Detokenizer(Protocol):
    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...


class DecodeCache(Protocol):
    """A KV cache that a backend fills; ``release`` frees it now."""

    def release(self) -> None: ...


class Backend(Protocol):
    """A loaded model, seen by the decode loop."""

    @property
    def name(self) -> str: ...

    @property
    def device_type(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    def new_cache(self, capacity: int) -> DecodeCache: ...

    def prefill(self, ids: list[int], cache: Any) -> torch.Tensor:
        """Logits after the last of ``ids``."""
        ...

    def decode(self, token: int, cache: Any) -> torch.Tensor: ...

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the ids that may be sampled (others ``-inf``)."""
        ...

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer: ...


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """One generation request, validated, in the loop's terms."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    checkpoint_every: int = 8

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this request."""
        prompt = json.dumps(self.prompt_ids, separators=(",", ":")).encode()
        return {
            "prompt_sha256": hashlib.sha256(prompt).hexdigest(),
            **asdict(self.sampling),
            "stop": list(self.stop),
        }


class ChunkBatcher:
    """Sends text pieces, joining those that come less than ``interval`` after a send."""

    def __init__(self, send: Callable[[str], None], interval: float = CHUNK_INTERVAL) -> None:
        self._send = send
        self._interval = interval
        self._pending: list[str] = []
        self._last_send = -float("inf")
        self.text: list[str] = []
        """Every piece so far, sent or pending: ``"".join(text)`` is the output."""

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.text.append(piece)
        self._pending.append(piece)
        if time.perf_counter() - self._last_send >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            chunk = "".join(self._pending)
            self._pending.clear()
            self._last_send = time.perf_counter()
            self._send(chunk)

    @property
    def output(self) -> str:
        return "".join(self.text)


def resumed_ids(state: Any, model: str, request: Generation, vocab_size: int) -> list[int]:
    """The ids an earlier attempt generated, after checking they belong to this request.

    Numbers may come back as integral floats (JSON through ``google.protobuf.Struct``).
    """
    if state is None:
        return []
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"resume_state is not an llm.generate checkpoint of version {CHECKPOINT_VERSION}"
        )
    if state.get("model") != model:
        raise ValueError(
            f"resume_state belongs to another generation: its model is "
            f"{state.get('model')!r}, this task's is {model!r}"
        )
    saved = state.get("request")
    saved = saved if isinstance(saved, dict) else {}
    for key, value in request.fingerprint().items():
        if saved.get(key) != value:
            raise ValueError(
                f"resume_state belongs to another generation: its {key} is "
                f"{saved.get(key)!r}, this task's is {value!r}"
            )
    ids = state.get("generated_ids")
    if not isinstance(ids, list) or not all(_is_token_id(i, vocab_size) for i in ids):
        raise ValueError(
            f"resume_state generated_ids must be a list of token ids below {vocab_size}"
        )
    return [int(i) for i in ids]


def _is_token_id(value: Any, vocab_size: int) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return float(value).is_integer() and 0 <= value < vocab_size


def run(
    ctx: LLMTaskContext, backend: Backend, request: Generation, started: float
) -> dict[str, Any]:
    """Generate (or resume) ``request`` on ``backend``; the result dict of ``llm.generate``.

    ``started`` is the ``time.perf_counter()`` at which the task began (time to first
    token counts from it).
    """
    generated = resumed_ids(ctx.resume_state, backend.name, request, backend.vocab_size)
    del generated[request.max_tokens :]
    resumed = len(generated)
    loop = _Loop(ctx, backend, request, generated)
    finish_reason = loop.replay()
    first_token_at = last_token_at = None
    if finish_reason is None:
        cache = backend.new_cache(len(request.prompt_ids) + request.max_tokens)
        logits: torch.Tensor | None = None
        try:
            logits = backend.prefill(request.prompt_ids, cache)
            if generated:
                ctx.progress(0.0, f"resuming: replaying {len(generated)} generated tokens")
                for token in generated:
                    logits = backend.decode(token, cache)
            finish_reason = "length"
            for step in range(len(generated), request.max_tokens):
                with ctx.uninterruptible():
                    token = choose_token(
                        backend.scores(logits),
                        request.sampling.temperature,
                        request.sampling.seed,
                        step,
                        top_k=request.sampling.top_k,
                        top_p=request.sampling.top_p,
                    )
                    last_token_at = time.perf_counter()
                    first_token_at = first_token_at or last_token_at
                    stopped = loop.step(token)
                    if stopped:
                        finish_reason = stopped
                        loop.save_if_interrupted()
                        break
                    if len(generated) < request.max_tokens and not ctx.interrupted:
                        logits = backend.decode(token, cache)
                    loop.save_if_interrupted()
                # uninterruptible() raises on exit when interrupted; check() covers a
                # context that only records the flag.
                if ctx.interrupted:
                    ctx.check()
        finally:
            # Give the KV cache back now, even when interrupted: the runtime's cleanup then
            # has nothing of ours to find in this frame.
            cache.release()
            del logits
    text = loop.finish()
    ended = time.perf_counter()
    new_tokens = len(generated) - resumed
    decode_seconds = (last_token_at - first_token_at) if first_token_at and last_token_at else 0.0
    return {
        "text": text,
        "model": backend.name,
        "device": backend.device_type,
        "finish_reason": finish_reason,
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": len(generated),
        "tokens": len(generated),
        "resumed_tokens": resumed,
        "timings": {
            "time_to_first_token_seconds": (first_token_at - started) if first_token_at else 0.0,
            "decode_seconds": decode_seconds,
            "tokens_per_second": (new_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0,
            "total_seconds": ended - started,
        },
    }


class _Loop:
    """The per-token bookkeeping of :func:`run`: text, stop sequences, progress, checkpoints."""

    def __init__(
        self, ctx: LLMTaskContext, backend: Backend, request: Generation, generated: list[int]
    ) -> None:
        self.ctx = ctx
        self.backend = backend
        self.request = request
        self.generated = generated
        self.detokenizer = backend.detokenizer(request.prompt_ids)
        self.stops = StopMatcher(request.stop)
        self.batcher = ChunkBatcher(ctx.emit)
        self.last_progress = time.perf_counter()
        self.saved = -1
        """How many generated ids the last checkpoint held."""

    def replay(self) -> str | None:
        """Stream the text of the resumed ids as one chunk; a finish reason if they end it.

        The replayed ids are checkpointed again at once, so this attempt can itself be
        resumed even if it is stopped before its first periodic checkpoint.
        """
        if not self.generated:
            return None
        pieces = []
        for index, token in enumerate(self.generated):
            pieces.append(self.stops.push(self.detokenizer.push(token)))
            if self.stops.stopped:
                del self.generated[index + 1 :]
                break
        self.batcher.add("".join(pieces))
        self.batcher.flush()
        self.checkpoint()
        if self.stops.stopped:
            return "stop"
        if len(self.generated) >= self.request.max_tokens:
            return "length"
        return None

    def step(self, token: int) -> str | None:
        """Account for one sampled token; a finish reason when it ends the generation."""
        if token in self.backend.eos_ids:
            return "eos"
        self.generated.append(token)
        self.batcher.add(self.stops.push(self.detokenizer.push(token)))
        count, limit = len(self.generated), self.request.max_tokens
        now = time.perf_counter()
        if now - self.last_progress >= PROGRESS_INTERVAL or count == limit:
            self.last_progress = now
            self.ctx.progress(count / limit, f"token {count}/{limit}")
        every = self.request.checkpoint_every
        if every > 0 and count % every == 0:
            self.checkpoint()
        return "stop" if self.stops.stopped else None

    def save_if_interrupted(self) -> None:
        """At the end of an interrupted step: send pending text and checkpoint (once)."""
        if self.ctx.interrupted and self.saved != len(self.generated):
            self.checkpoint()

    def checkpoint(self) -> None:
        self.batcher.flush()  # the checkpoint's text is what subscribers have
        self.saved = len(self.generated)
        self.ctx.checkpoint(
            {
                "version": CHECKPOINT_VERSION,
                "model": self.backend.name,
                "request": self.request.fingerprint(),
                "generated_ids": list(self.generated),
                "text": self.batcher.output,
            }
        )

    def finish(self) -> str:
        """Send what is still held (detokenizer, stop matcher, batcher); the full text."""
        if not self.stops.stopped:
            self.batcher.add(self.stops.push(self.detokenizer.flush()))
            self.batcher.add(self.stops.flush())
        self.batcher.flush()
        return self.batcher.output
