"""Choosing the next token: greedy, or a seeded draw with temperature, top-k and top-p.

The draw for step ``n`` of a generation seeded with ``s`` comes from a generator seeded
by a hash of ``(s, n)``, never from a running RNG: a resumed generation draws at each step
exactly what the uninterrupted one drew. The draw runs on the CPU in float32, so it does
not depend on which device computed the logits (only the logits themselves do).
"""

from __future__ import annotations

import hashlib
import math

import torch


def step_seed(seed: int, step: int) -> int:
    """The sampling seed for token ``step`` of a generation seeded with ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def choose_token(
    scores: torch.Tensor,
    temperature: float,
    seed: int,
    step: int,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """The next token id from ``scores`` (logits over the candidate ids, ``-inf`` = never).

    Temperature 0 is argmax. Otherwise the logits are divided by ``temperature``, cut to
    the ``top_k`` best (0: all) and to the smallest set whose probability reaches
    ``top_p`` (1: all), and one id is drawn with the (seed, step) generator.
    """
    logits = scores.detach().to("cpu", torch.float32)
    if temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # Keep a token while the mass before it is below top_p: the first always stays.
        drop = (torch.cumsum(ordered, dim=-1) - ordered) >= top_p
        probs = probs.clone()
        probs[order[drop]] = 0.0
        probs = probs / probs.sum()
    generator = torch.Generator().manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=generator))
