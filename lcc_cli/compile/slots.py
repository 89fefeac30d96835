"""Buffer slots: where they start, how the compiler pass encodes them, and how the reader
sees them. Shared by per-document optimisation, the pretrained compiler and its training.

The compiler pass puts the slots right after the context turn, at positions n..n+S-1, so
that they can attend to it. The reader never sees the context; it sees the buffer:

- without a sink, the S slots, and the question at n+S (stored moved to 0..S-1);
- with a sink, first the context's own first token (its KV does not depend on the document:
  nothing comes before it), then the slots re-rotated to positions 1..S, and the question
  at S+1. Attention sinks are where a model parks attention it does not need; a buffer
  without one makes every slot compete for that mass (the Cartridges paper freezes the
  first slot for this reason). The sink counts as one of the K = ceil(n / ratio) entries.
"""

from __future__ import annotations

import torch

from ..buffer import Buffer, Rope
from ..runtime.cache import Layers, cache_layers, forward, make_cache
from .base import slot_count


def entries(n_tokens: int, ratio: float, sink: bool) -> tuple[int, int]:
    """(K buffer entries, S trainable slots) for a context turn of n tokens."""
    k = slot_count(n_tokens, ratio)
    if sink:
        k = max(k, 2)
        return k, k - 1
    return k, k


def evenly_spaced_embeddings(model, ctx_ids: list[int], count: int) -> torch.Tensor:
    """Each slot starts as the embedding of an evenly spaced context token: a start that
    already points at the segment's content."""
    idx = torch.linspace(0, len(ctx_ids) - 1, count).round().long()
    table = model.get_input_embeddings().weight
    return table[torch.tensor(ctx_ids, device=table.device)[idx]].detach().clone()


def chunk_embeddings(model, ctx_ids: list[int], count: int) -> torch.Tensor:
    """Each slot starts as the mean embedding of its share of the context (`count` equal
    chunks): every token contributes to exactly one slot. float32 [count, hidden]."""
    table = model.get_input_embeddings().weight
    emb = table[torch.tensor(ctx_ids, device=table.device)].float()
    sums = torch.cat([torch.zeros_like(emb[:1]), emb.cumsum(0)])
    bounds = torch.linspace(0, len(ctx_ids), count + 1, device=emb.device).round().long()
    widths = (bounds[1:] - bounds[:-1]).clamp(min=1).unsqueeze(-1)
    return ((sums[bounds[1:]] - sums[bounds[:-1]]) / widths).detach()


def encode_slots(model, ctx_kv: Layers, embeds: torch.Tensor, n: int) -> Layers:
    """Compiler pass (LoRA attached and enabled): the slots after the frozen context.
    Returns the slots' own KV ([1, kv_heads, S, head_dim] per layer), gradients attached."""
    cache = make_cache(ctx_kv)
    dtype = next(model.parameters()).dtype
    forward(model, cache, n, inputs_embeds=embeds.to(dtype).unsqueeze(0), logits_to_keep=1)
    return [(key[:, :, n:], value[:, :, n:]) for key, value in cache_layers(cache)]


def reader_view(ctx_kv: Layers, slot_kv: Layers, n: int, sink: bool, rope: Rope) -> tuple[Layers, int]:
    """The reader's cache for these slots, and where its question starts."""
    slots = slot_kv[0][0].shape[-2]
    if not sink:
        return slot_kv, n + slots
    view = [(torch.cat([ck[:, :, :1], rope.shift(sk, -(n - 1))], dim=2), torch.cat([cv[:, :, :1], sv], dim=2))
            for (ck, cv), (sk, sv) in zip(ctx_kv, slot_kv)]
    return view, slots + 1


def view_buffer(view: Layers, first: int) -> Buffer:
    """A reader view (keys [1, kv_heads, T, head_dim] with gradients) as a Buffer whose
    entries end just before `first`, so that Buffer.laid_out can put views side by side."""
    count = view[0][0].shape[-2]
    return Buffer([k for k, _ in view], [v for _, v in view], torch.arange(first - count, first))


def to_buffer(view: Layers, first: int, sink: bool, rope: Rope) -> Buffer:
    """The reader view as a stored buffer at positions 0..K-1 (detached copies)."""
    layers = [(k.detach().clone(), v.detach().clone()) for k, v in view]
    k = layers[0][0].shape[-2]
    buffer = Buffer.from_cache_layers(layers, range(first - k, first))
    return buffer if sink else buffer.moved(rope, -(first - k))
