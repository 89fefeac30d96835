"""Routing (issue 18, "try it, keep it if it measures well"): a question about a long document
reads only the segments its own attention favours, instead of every segment side by side.

The question is run once over the whole composed buffer; the queries it produces at every
layer score each segment by the attention mass they give its entries (softmax over all
entries, averaged over layers, heads and question tokens; each segment's sink excluded, since
sinks take mass by design). The `keep` best segments are then laid out one after another, in
document order, and the question is answered from those alone. One extra pass over the
question's tokens.
"""

from __future__ import annotations

import torch

from ..buffer import Buffer
from .bias import slot_biases
from .cache import forward, make_cache


def segment_scores(loaded, buffer: Buffer, segments: list[dict], question: str) -> list[float]:
    """Attention mass of `question` per segment (rows: {"slots", "sink"} in cache order)."""
    model, rope, p = loaded.model, loaded.rope, loaded.prompter
    layers = model.model.layers
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    head_dim = loaded.facts.head_dim
    prompt = p.query_ids(question)
    first = buffer.first_query_position
    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
             for layer in layers]
    try:
        with torch.inference_mode(), slot_biases(model, buffer.bias):
            forward(model, make_cache(buffer.cache_layers()), first,
                    input_ids=torch.tensor([prompt], device=loaded.device), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    owner = torch.cat([torch.full((s["slots"],), i) for i, s in enumerate(segments)])
    counted = torch.ones(len(owner), dtype=torch.bool)
    start = 0
    for s in segments:
        if s.get("sink"):
            counted[start] = False
        start += s["slots"]
    positions = torch.arange(first, first + len(prompt), device=loaded.device)
    mass = torch.zeros(len(segments))
    with torch.inference_mode():
        for layer, (q_flat, key) in enumerate(zip(captured, buffer.keys)):
            q = rope.shift(q_flat.float().reshape(len(prompt), heads, head_dim).transpose(0, 1), positions)
            k = key.float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, T, D]
            logits = q @ k.transpose(1, 2) / head_dim ** 0.5
            if buffer.bias is not None:
                logits = logits + buffer.bias[layer].to(logits.device).repeat_interleave(heads // kv_heads, 0)[:, None]
            weights = torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()
            mass.index_add_(0, owner[counted], weights[counted])
    return (mass / len(captured)).tolist()


def choose(loaded, buffer: Buffer, segments: list[dict], question: str, keep: int) -> list[int]:
    """Indices of the `keep` segments the question attends to most, in document order."""
    if len(segments) <= keep:
        return list(range(len(segments)))
    scores = segment_scores(loaded, buffer, segments, question)
    return sorted(sorted(range(len(segments)), key=lambda i: -scores[i])[:keep])


def select(loaded, buffer: Buffer, segments: list[dict], chosen: list[int]) -> Buffer:
    """Those segments' entries laid out one after another from position 0."""
    if chosen == list(range(len(segments))):
        return buffer
    starts = [sum(s["slots"] for s in segments[:i]) for i in range(len(segments))]
    parts, offset = [], 0
    for i in chosen:
        part = buffer.select(starts[i], starts[i] + segments[i]["slots"])
        part = part.moved(loaded.rope, offset - int(part.positions.min()))
        parts.append(part)
        offset = part.first_query_position
    return Buffer.concat(parts)


def routed(loaded, buffer: Buffer, segments: list[dict], question: str, keep: int) -> Buffer:
    """The buffer of the `keep` segments the question attends to most, laid out consecutively."""
    return select(loaded, buffer, segments, choose(loaded, buffer, segments, question, keep))
