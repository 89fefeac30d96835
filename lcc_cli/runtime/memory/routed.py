"""`Routed` memory: a multi-segment cartridge read through only the segments the question's
own attention favours (issue 18: one extra pass over the question's tokens)."""

from __future__ import annotations

from typing import Hashable

import torch

from ...buffer import Buffer
from ...format.cartridge import Cartridge
from ..reading import View


class Routed:
    """A cartridge's segments, each question reading the `keep` its attention favours, laid out
    one after another in document order."""

    mode = "cartridge"

    def __init__(self, loaded, cart: Cartridge, keep: int):
        self.loaded, self.keep = loaded, keep
        self.buffer = cart.buffer.to(loaded.device, loaded.dtype)
        self.segments = cart.segments
        self._chosen: dict[str, tuple[int, ...]] = {}
        self._views: dict[tuple[int, ...], View] = {}

    def key(self, question: str) -> Hashable:
        if question not in self._chosen:
            self._chosen[question] = tuple(choose_segments(self.loaded, self.buffer, self.segments, question,
                                                           self.keep))
        return self._chosen[question]

    def view(self, question: str) -> View:
        chosen = self.key(question)
        if chosen not in self._views:
            if list(chosen) == list(range(len(self.segments))):
                buffer = self.buffer
            else:
                starts = [sum(s["slots"] for s in self.segments[:i]) for i in range(len(self.segments))]
                buffer = Buffer.laid_out([self.buffer.select(starts[i], starts[i] + self.segments[i]["slots"])
                                          for i in chosen], self.loaded.rope)
            if len(self._views) > 64:
                self._views.clear()
            self._views[chosen] = View(buffer, key=("routed", id(self), chosen))
        return self._views[chosen]

    def end(self, question: str) -> int:
        return self.view(question).end


def segment_scores(loaded, buffer: Buffer, segments: list[dict], question: str) -> list[float]:
    """Attention mass of `question` per segment (rows: {"slots", "sink"} in cache order): the
    question is run once over the whole buffer; the queries it produces at every layer score
    each segment by the attention they give its entries (softmax over all entries, averaged
    over layers, heads and question tokens; each segment's sink excluded, since sinks take
    mass by design)."""
    from ..bias import slot_biases
    from ..cache import forward, make_cache

    model, rope, p = loaded.model, loaded.rope, loaded.prompter
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    head_dim = loaded.facts.head_dim
    prompt = p.query_ids(question)
    first = buffer.first_query_position
    with loaded.family.capture_queries(model) as captured, slot_biases(model, buffer.bias):
        with torch.inference_mode():
            forward(model, make_cache(buffer.cache_layers()), first,
                    input_ids=torch.tensor([prompt], device=loaded.device), logits_to_keep=1)
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
            q = rope.shift(q_flat[0].float().reshape(len(prompt), heads, head_dim).transpose(0, 1), positions)
            k = key.float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, T, D]
            logits = q @ k.transpose(1, 2) / head_dim ** 0.5
            if buffer.bias is not None:
                logits = logits + buffer.bias[layer].to(logits.device).repeat_interleave(heads // kv_heads, 0)[:, None]
            weights = torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()
            mass.index_add_(0, owner[counted], weights[counted])
    return (mass / len(captured)).tolist()


def choose_segments(loaded, buffer: Buffer, segments: list[dict], question: str, keep: int) -> list[int]:
    """Indices of the `keep` segments the question attends to most, in document order."""
    if len(segments) <= keep:
        return list(range(len(segments)))
    scores = segment_scores(loaded, buffer, segments, question)
    return sorted(sorted(range(len(segments)), key=lambda i: -scores[i])[:keep])
