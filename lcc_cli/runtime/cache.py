"""Per-layer key/value caches: build them, run the model over them, read them back.

Everything that touches transformers' cache object lives here, so the compiler and the
reader speak in plain tensors: a list of (keys, values) per layer, each [batch, kv_heads,
positions, head_dim]. RoPE is already applied to stored keys, which is why every call takes
an explicit first position: a token's cache index and its RoPE position differ as soon as a
buffer sits in the cache (see buffer.py).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def make_cache(layers: Layers | None, batch: int = 1) -> DynamicCache:
    """A fresh cache holding `layers` (expanded to `batch` rows without copying)."""
    if not layers:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v in layers])


def cache_layers(cache: DynamicCache) -> Layers:
    """The (keys, values) tensors held in a cache, per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_kwargs(model, cache: DynamicCache) -> dict:
    """The cache as the keyword this transformers version takes: `cache` (5.2x) or
    `past_key_values` (earlier 5.x, where an unknown `cache=` is silently ignored)."""
    params = _forward_params(type(model))
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


_PARAMS: dict = {}


def _forward_params(cls) -> set[str]:
    if cls not in _PARAMS:
        import inspect

        _PARAMS[cls] = set(inspect.signature(cls.forward).parameters)
    return _PARAMS[cls]


def forward(model, cache: DynamicCache, first_position: int, input_ids=None, inputs_embeds=None,
            logits_to_keep: int = 0):
    """Run the model on new tokens placed at RoPE positions first_position.., appending
    their KV to `cache`. Returns logits [batch, tokens, vocab] (or the last `logits_to_keep`)."""
    x = input_ids if input_ids is not None else inputs_embeds
    batch, length = x.shape[0], x.shape[1]
    positions = torch.arange(first_position, first_position + length, device=x.device).expand(batch, -1)
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions, use_cache=True,
                logits_to_keep=logits_to_keep, **cache_kwargs(model, cache))
    return out.logits


def prefill(model, ids: list[int], first_position: int = 0) -> tuple[Layers, torch.Tensor]:
    """Encode `ids` from an empty cache; returns their KV and the last position's logits."""
    cache = make_cache(None)
    device = next(model.parameters()).device
    logits = forward(model, cache, first_position, input_ids=torch.tensor([ids], device=device), logits_to_keep=1)
    return cache_layers(cache), logits[0, -1]


def forward_rows(model, cache: DynamicCache, positions: torch.Tensor, mask: torch.Tensor, input_ids=None,
                 inputs_embeds=None, logits_to_keep: int = 0):
    """`forward` with a RoPE position per row and token ([batch, tokens]) and a padding mask
    over cache + new tokens ([batch, cached + tokens], 1 = attend): rows whose caches and
    prompts have different lengths, padded, in one pass."""
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=mask,
                use_cache=True, logits_to_keep=logits_to_keep, **cache_kwargs(model, cache))
    return out.logits
