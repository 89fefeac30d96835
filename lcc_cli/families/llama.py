"""Llama and the models built like it: SmolLM2 (the embedded model), Llama 2/3, Mistral.

Queries are read from `q_proj` (no query norm); RoPE is rotate-half with the config's
`rope_theta` and, for Llama 3, its frequency scaling; the chat template renders a system
turn as a prefix of the conversation. All of that is `Family`'s default."""

from __future__ import annotations

from . import Family, register


@register
class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral")
