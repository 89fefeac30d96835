"""Per-layer key/value caches: build them from tensors, run the model over them, read them back.

Everything that touches transformers' cache object lives here, so the compiler and the
reader speak in plain tensors: a list of (keys, values) per layer, each [batch, kv_heads,
positions, head_dim]. RoPE is already applied to the stored keys, which is why every call
takes explicit `position_ids`: the cache index of a token and its RoPE position differ once
a cartridge's buffer sits at positions n..n+K-1 but at cache indices 0..K-1.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]


def make_cache(kv: KV | None, batch: int = 1) -> DynamicCache:
    """A fresh cache holding `kv` (expanded to `batch` rows without copying)."""
    if not kv:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def cache_kv(cache: DynamicCache) -> KV:
    """The (keys, values) tensors held in a cache, per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def forward(model, cache: DynamicCache, first_position: int, input_ids=None, inputs_embeds=None,
            logits_to_keep: int = 0):
    """Run the model on new tokens placed at RoPE positions first_position.., appending
    their KV to `cache`. Returns logits [batch, tokens, vocab] (or the last `logits_to_keep`)."""
    x = input_ids if input_ids is not None else inputs_embeds
    batch, length = x.shape[0], x.shape[1]
    positions = torch.arange(first_position, first_position + length, device=x.device).expand(batch, -1)
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits


def prefill(model, ids: list[int], first_position: int = 0) -> tuple[KV, torch.Tensor]:
    """Encode `ids` from an empty cache; returns their KV and the last position's logits."""
    cache = make_cache(None)
    device = model.device
    logits = forward(model, cache, first_position, input_ids=torch.tensor([ids], device=device), logits_to_keep=1)
    return cache_kv(cache), logits[0, -1]

