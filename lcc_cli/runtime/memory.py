"""Memory: the one place that opens cartridges for reading, composes them, and says which
entries a question reads.

`lcc ask`, `chat`, `serve` and `eval` all go through here:

    carts = read_cartridges(paths)                # format and integrity (no model needed)
    memory = open_memory(carts, loaded, names)     # model checks, composition, the kind of memory
    buffer = memory.view(question)                 # the entries this question reads
    memory.key(question)                           # questions with equal keys read one buffer

A kind of memory is one class with `view` and `key`; readers never learn which kind they
hold:

- `Whole`: every entry of its cartridges, side by side (the question reads them all);
- `Routed`: a multi-segment cartridge read through only the segments the question's own
  attention favours (one extra pass over the question's tokens; issue 18).

Composition lays cartridges out one after another (`consecutive`, like consecutive text:
each one's keys re-rotated to follow the previous) or lets them overlap at their own
positions (`overlap`; the question after the largest). Both keep each cartridge's internal
distances (docs/experiments.md measured them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Literal, Protocol

import torch

from ..buffer import Buffer
from ..errors import ModelMismatchError
from ..format.cartridge import Cartridge, load_cartridge
from ..format.checks import check_compatible, check_fingerprint

Layout = Literal["consecutive", "overlap"]
DEFAULT_LAYOUT: Layout = "consecutive"


class Memory(Protocol):
    mode: str  # what `ask --json` reports: "cartridge"

    def view(self, question: str) -> Buffer:
        """The entries `question` reads, on the model's device and dtype."""

    def key(self, question: str) -> Hashable:
        """Equal for questions that read the same buffer (they may share one batch)."""


def read_cartridges(paths: list[Path]) -> list[Cartridge]:
    """Every cartridge read and checked as a file (integrity, values): before a model loads,
    so that a bad file fails in a second, not after the model's load."""
    return [load_cartridge(p) for p in paths]


def check_model(cart: Cartridge, loaded, name: str, force: bool = False) -> None:
    """Shapes, RoPE and window must fit the model (even with force); the fingerprint must be
    the model's unless forced."""
    check_compatible(cart.manifest["model"], loaded.facts, cart.buffer.first_query_position, name)
    check_fingerprint(cart.manifest["model"], loaded.model_id, loaded.fingerprint, name, force)


def compose(carts: list[Cartridge], layout: Layout = DEFAULT_LAYOUT, force: bool = False) -> Buffer:
    """One buffer from several cartridges (all for the same model, unless forced)."""
    if len({c.fingerprint for c in carts}) > 1 and not force:
        raise ModelMismatchError("the cartridges were made for different models", hint="pass --force to mix them")
    if len(carts) == 1 or layout == "overlap":
        return Buffer.concat([c.buffer for c in carts])
    return Buffer.laid_out([c.buffer for c in carts], carts[0].rope)


class Whole:
    """Every entry of the composed cartridges, for every question."""

    mode = "cartridge"

    def __init__(self, buffer: Buffer, loaded=None):
        self.buffer = buffer if loaded is None else buffer.to(loaded.device, loaded.dtype)

    def view(self, question: str) -> Buffer:
        return self.buffer

    def key(self, question: str) -> Hashable:
        return ()


class Routed:
    """A cartridge's segments, each question reading the `keep` its attention favours, laid out
    one after another in document order."""

    mode = "cartridge"

    def __init__(self, loaded, cart: Cartridge, keep: int):
        self.loaded, self.keep = loaded, keep
        self.buffer = cart.buffer.to(loaded.device, loaded.dtype)
        self.segments = cart.segments
        self._chosen: dict[str, tuple[int, ...]] = {}

    def key(self, question: str) -> Hashable:
        if question not in self._chosen:
            self._chosen[question] = tuple(choose_segments(self.loaded, self.buffer, self.segments, question,
                                                           self.keep))
        return self._chosen[question]

    def view(self, question: str) -> Buffer:
        chosen = list(self.key(question))
        if chosen == list(range(len(self.segments))):
            return self.buffer
        starts = [sum(s["slots"] for s in self.segments[:i]) for i in range(len(self.segments))]
        return Buffer.laid_out([self.buffer.select(starts[i], starts[i] + self.segments[i]["slots"]) for i in chosen],
                               self.loaded.rope)


def open_memory(carts: list[Cartridge], loaded, names: list[str] | None = None, force: bool = False,
                layout: Layout = DEFAULT_LAYOUT, route: int | None = None) -> Memory:
    """The memory a question reads from these cartridges, checked against the model. `route`:
    each question reads only that many segments of a one-cartridge, multi-segment memory."""
    names = names or [f"cartridge {i + 1}" for i in range(len(carts))]
    for cart, name in zip(carts, names):
        check_model(cart, loaded, name, force)
    if route and len(carts) == 1 and len(carts[0].segments) > route:
        return Routed(loaded, carts[0], route)
    return Whole(compose(carts, layout, force), loaded)


def answer_all(loaded, memory: Memory, questions: list[str], cfg, batch: bool = True) -> list:
    """Every question answered from the entries it reads: questions that read the same ones are
    decoded together (with `batch`), each with its own prompt (runtime.reader.Answer, in order)."""
    from .reader import answer

    groups: dict[Hashable, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(memory.key(q), []).append(i)
    out = [None] * len(questions)
    for members in groups.values():
        buffer = memory.view(questions[members[0]])
        for i, a in zip(members, answer(loaded, [questions[i] for i in members], buffer=buffer, cfg=cfg,
                                        batch=batch)):
            out[i] = a
    return out


# --- routing: the question's attention over the segments -------------------------------------

def segment_scores(loaded, buffer: Buffer, segments: list[dict], question: str) -> list[float]:
    """Attention mass of `question` per segment (rows: {"slots", "sink"} in cache order): the
    question is run once over the whole buffer; the queries it produces at every layer score
    each segment by the attention they give its entries (softmax over all entries, averaged
    over layers, heads and question tokens; each segment's sink excluded, since sinks take
    mass by design)."""
    from .bias import slot_biases
    from .cache import forward, make_cache

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


def choose_segments(loaded, buffer: Buffer, segments: list[dict], question: str, keep: int) -> list[int]:
    """Indices of the `keep` segments the question attends to most, in document order."""
    if len(segments) <= keep:
        return list(range(len(segments)))
    scores = segment_scores(loaded, buffer, segments, question)
    return sorted(sorted(range(len(segments)), key=lambda i: -scores[i])[:keep])
