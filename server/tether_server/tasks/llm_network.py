"""The network of the built-in demo model, in plain torch: a decoder-only transformer.

Learned positions, pre-norm blocks of causal multi-head attention and a GELU MLP, a final
norm and an LM head tied to the token embedding, with a preallocated :class:`KVCache`.
:func:`init_weights` fills a new network with seeded random weights (and a prior that
favours printable ASCII), drawn on its device. :mod:`.llm_model` builds, loads, caches
and serves it as an ``llm.generate`` backend.
"""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from .llm_catalog import BYTE_VOCAB, EOS_ID, ModelConfig

__all__ = ["KVCache", "Transformer", "init_weights"]


class _Placement(TypedDict):
    device: torch.device
    dtype: torch.dtype


class KVCache:
    """Keys and values of every layer, preallocated for ``capacity`` positions."""

    def __init__(
        self, config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        head_dim = config.d_model // config.n_heads
        shape = (1, config.n_heads, capacity, head_dim)
        self.capacity = capacity
        self.length = 0
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.empty(shape, device=device, dtype=dtype),
                torch.empty(shape, device=device, dtype=dtype),
            )
            for _ in range(config.n_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def release(self) -> None:
        """Drop the tensors now rather than when the last reference to the cache goes."""
        self.layers.clear()
        self.length = 0
        self.capacity = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, place: _Placement) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        d_model = config.d_model
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, **place)
        self.out = nn.Linear(d_model, d_model, bias=False, **place)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        batch, length, d_model = x.shape
        head_dim = d_model // self.n_heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        if past is not None:
            cache_k, cache_v = past
            cache_k[:, :, start : start + length] = k
            cache_v[:, :, start : start + length] = v
            k = cache_k[:, :, : start + length]
            v = cache_v[:, :, : start + length]
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        elif length == 1:  # one new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a cached prefix: causal within the chunk
            mask = torch.ones(length, start + length, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.tril(diagonal=start))
        return self.out(y.transpose(1, 2).reshape(batch, length, d_model))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, place: _Placement) -> None:
        super().__init__()
        d_model, d_ff = config.d_model, config.d_ff
        self.attn_norm = nn.RMSNorm(d_model, **place)
        self.attn = CausalSelfAttention(config, place)
        self.mlp_norm = nn.RMSNorm(d_model, **place)
        self.mlp_in = nn.Linear(d_model, d_ff, bias=False, **place)
        self.mlp_out = nn.Linear(d_ff, d_model, bias=False, **place)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, start: int
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), past, start)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))  # type: ignore[no-any-return]


def _embedding(count: int, dim: int, place: _Placement) -> nn.Embedding:
    # Skips nn.Embedding's own init: init_weights or a state dict fills the weight.
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim, **place))


class Transformer(nn.Module):
    """Decoder-only transformer over ``ModelConfig``; the LM head is the token embedding.

    Parameters are created directly on ``device`` in ``dtype``; ``init_weights`` or a
    state dict then fills them. (Not on "meta" then ``to_empty``: the first meta op in
    a process imports torch's meta registrations, ~0.6 s, more than torch's own init.)
    """

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        place: _Placement = {"device": device, "dtype": dtype}
        self.config = config
        self.tok_emb = _embedding(config.vocab_size, config.d_model, place)
        self.pos_emb = _embedding(config.max_seq_len, config.d_model, place)
        self.blocks = nn.ModuleList(Block(config, place) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, **place)
        # A per-token logit bias. Random weights give it a prior favouring printable
        # ASCII (see init_weights), so a random model streams readable gibberish.
        self.head_bias = nn.Parameter(torch.zeros(config.vocab_size, **place))

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Float32 logits ``[batch, len, vocab]`` of ``ids`` ``[batch, len]``.

        With a cache, ``ids`` continue the cached positions and the cache grows by
        ``len``; without one, ``ids`` start at position 0.
        """
        start = 0 if cache is None else cache.length
        length = ids.shape[1]
        if cache is not None and start + length > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, needs {start + length}")
        positions = torch.arange(start, start + length, device=ids.device)
        x = self.tok_emb(ids) + self.pos_emb(positions)
        for index, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[index], start)
        if cache is not None:
            cache.length += length
        # Logits in float32: sampling and argmax should not depend on bf16 rounding.
        return F.linear(self.norm(x).float(), self.tok_emb.weight.float(), self.head_bias.float())


def init_weights(module: Transformer, seed: int) -> None:
    """Seeded random weights, drawn on the module's device.

    Linear layers are variance-preserving (std 1/sqrt(fan_in)); embeddings have std
    1/sqrt(d_model) so tied logits have a std near 1, which keeps a random model's
    output varied instead of peaked on one byte.
    """
    device = module.tok_emb.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    d_model = module.config.d_model
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name == "head_bias":
                parameter.copy_(_text_prior(parameter.shape[0]))
            elif name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("_emb.weight"):
                parameter.normal_(0.0, d_model**-0.5, generator=generator)
            else:
                parameter.normal_(0.0, parameter.shape[1] ** -0.5, generator=generator)


def _text_prior(vocab_size: int) -> torch.Tensor:
    """Logit bias of a random model: letters and spaces first, then other printable ASCII."""
    prior = torch.zeros(vocab_size)
    for byte in range(BYTE_VOCAB):
        char = chr(byte)
        if char.isascii() and (char.isalpha() or char == " "):
            prior[byte] = 3.0
        elif char.isascii() and (char.isprintable() or char == "\n"):
            prior[byte] = 1.5
    prior[EOS_ID] = -1.0
    return prior
