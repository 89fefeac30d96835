"""Qwen2 and Qwen3.

Qwen2 is built like Llama (its `q_proj` has a bias, which the hook reads with it). Qwen3
normalises each head's queries and keys (`q_norm`, `k_norm`) after the projection and before
RoPE: its attention scores `q_norm`'s output, so that is where queries are read. Qwen3's chat
template writes an empty thinking block into the assistant header unless told not to think;
lcc's answers are direct, so every render says so."""

from __future__ import annotations

from . import Family, register


@register
class Qwen2(Family):
    name = "qwen2"
    model_types = ("qwen2",)


@register
class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)
    template_kwargs = {"enable_thinking": False}

    def query_module(self, layer):
        norm = getattr(getattr(layer, "self_attn", None), "q_norm", None)
        return norm if norm is not None else super().query_module(layer)
