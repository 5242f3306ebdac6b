"""LLM tasks: token-by-token generation that can be interrupted and resumed.

Registered names:

- ``llm.generate``: autoregressive generation with a KV cache on the engine's GPU (or
  CPU), on the built-in demo transformer (``model`` ``tiny``...) or on a Hugging Face
  checkpoint the operator configured (``--model NAME=PATH``); streams text as it is
  generated, checkpoints every few tokens, resumable exactly.
- ``llm.stuck_cuda``: one long GPU kernel (a long C call without CUDA) that no SIGINT
  can end; it exists to show that the escalation ladder needs SIGKILL.
- ``llm.hold_memory``: holds a task-local buffer while it sleeps; interrupting it shows
  whether the runtime gives an interrupted task's memory back.

torch is imported inside the task functions only: the controller imports this module to
know the task names and to validate requests (:mod:`.llm_request`), and must not pay for
``import torch``. The decode loop, streaming, checkpoints and resumption live in
:mod:`.generation`; the models in :mod:`.llm_model` (demo) and :mod:`.hf` (checkpoints).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from tether_server.runtime.registry import task

from . import llm_request

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


@task("llm.generate", validator=llm_request.validate_generate)
def generate(
    ctx: LLMTaskContext,
    prompt: str | None = None,
    messages: list[Any] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    stop: Any = None,
    model: str = "tiny",
    model_path: str = "",
    device: str = "auto",
    checkpoint_every: int = 8,
) -> dict[str, Any]:
    """Generate up to ``max_tokens`` tokens after ``prompt`` (or the chat ``messages``).

    ``messages`` (``[{"role": "system"|"user"|"assistant", "content": ...}]``) are
    rendered with the model's chat template, the assistant's turn opened. ``temperature``
    0 is greedy; above 0, tokens are drawn with ``seed`` after ``top_k`` (0: off) and
    ``top_p`` (1: off) filtering. ``stop`` (a string or a list) ends the text before the
    first stop sequence. ``model`` names an operator checkpoint or a built-in size
    (``tiny``, ``small``, ``large``, ``xl``: seeded random weights); ``model_path`` (only
    where the operator allows it) a directory. ``device`` is ``auto`` (CUDA when the
    engine has it), ``cpu`` or ``cuda``. ``checkpoint_every`` 0 checkpoints only on
    interrupt.

    Returns ``{"text", "model", "device", "finish_reason": "length"|"stop"|"eos",
    "prompt_tokens", "completion_tokens", "tokens", "resumed_tokens", "timings"}``;
    ``completion_tokens`` (and its older name ``tokens``) counts every generated token,
    those of a resumed attempt included.
    """
    started = time.perf_counter()
    from . import generation, llm_catalog, llm_model

    arguments = {
        "prompt": prompt,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop,
        "device": device,
        "checkpoint_every": checkpoint_every,
    }
    _raise_for(llm_request.check(arguments, None))
    try:
        entry = llm_catalog.entry_for(model, model_path)
    except (LookupError, PermissionError) as exc:
        raise ValueError(llm_request.message_of(exc)) from None
    target = llm_model.resolve_device(device)
    backend: generation.Backend
    if entry.kind == "hf":
        from . import hf

        checkpoint = hf.get_model(entry.name, entry.path, target)
        prompt_ids = checkpoint.encode(prompt, messages)
        backend = checkpoint
    else:
        if messages is not None:
            raise ValueError(f"model {entry.name!r} has no chat template: send a prompt")
        demo = llm_model.get_model(model, entry.path, target)
        prompt_ids = demo.encode_prompt(prompt or "")
        backend = demo
    _raise_for(
        llm_request.context_violations(
            entry.name, len(prompt_ids), max_tokens, entry.context_length
        )
    )
    request = generation.Generation(
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        sampling=generation.Sampling(temperature, top_p, top_k, seed),
        stop=llm_request.stop_sequences(stop),
        checkpoint_every=checkpoint_every,
    )
    return generation.run(ctx, backend, request, started)


def _raise_for(problems: list[Any]) -> None:
    if problems:
        raise ValueError("; ".join(problem.description for problem in problems))


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
