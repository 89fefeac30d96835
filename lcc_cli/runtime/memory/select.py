"""Scoring an indexed cartridge's pages for a question: BM25 over their text, the question's
attention over their key summaries, and the two fused by reciprocal rank.

Scores compare across cartridges: one BM25 over every page of every cartridge asked, and one
attention softmax over all their summaries.
"""

from __future__ import annotations

import torch

from ...eval.retrieve import terms

RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): ranks, not raw scores, are fused


class BM25:
    """Okapi BM25 (rank_bm25's scorer, as the `retrieve` baseline uses) over page texts."""

    def __init__(self, texts: list[str]):
        from rank_bm25 import BM25Okapi

        self.scorer = BM25Okapi([terms(t) or [""] for t in texts]) if texts else None

    def scores(self, question: str) -> list[float]:
        return list(map(float, self.scorer.get_scores(terms(question)))) if self.scorer else []


def question_queries(loaded, buffer, question: str) -> list[torch.Tensor]:
    """The question's queries before RoPE at every layer ([heads, tokens, D]), as the model
    makes them reading `buffer` (the always-read entries) before the question."""
    from ..bias import slot_biases
    from ..cache import forward, make_cache

    model, facts = loaded.model, loaded.facts
    heads = model.config.num_attention_heads
    prompt = loaded.prompter.query_ids(question)
    captured: list[torch.Tensor] = []

    def keep(module, args, out):
        captured.append(out[0].float())

    hooks = [(getattr(layer.self_attn, "q_norm", None) or layer.self_attn.q_proj).register_forward_hook(keep)
             for layer in model.model.layers]
    try:
        with torch.inference_mode(), slot_biases(model, buffer.bias):
            forward(model, make_cache(buffer.cache_layers()), buffer.first_query_position,
                    input_ids=torch.tensor([prompt], device=loaded.device), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return [q.reshape(len(prompt), heads, facts.head_dim).transpose(0, 1) for q in captured]


def attention_scores(queries: list[torch.Tensor], summaries: torch.Tensor, head_dim: int) -> list[float]:
    """The attention mass the question's queries give each page's mean key (before RoPE: the
    pages will be read right before the question, so their distance to it is small), softmax
    over all pages, averaged over layers, heads and the question's tokens. `summaries`:
    [pages, layers, kv_heads, D]."""
    if summaries.shape[0] == 0:
        return []
    mass = torch.zeros(summaries.shape[0])
    with torch.inference_mode():
        for layer, q in enumerate(queries):
            keys = summaries[:, layer].float().to(q.device)  # [P, kv_heads, D]
            keys = keys.repeat_interleave(q.shape[0] // keys.shape[1], dim=1).transpose(0, 1)  # [heads, P, D]
            logits = q @ keys.transpose(1, 2) / head_dim ** 0.5  # [heads, tokens, P]
            mass += torch.softmax(logits, dim=-1).mean(dim=(0, 1)).cpu()
    return (mass / len(queries)).tolist()


def fused(*rankings: list[float]) -> list[float]:
    """Reciprocal rank fusion of several score lists over the same pages."""
    out = [0.0] * len(rankings[0])
    for scores in rankings:
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        for rank, i in enumerate(order):
            out[i] += 1.0 / (RRF_K + rank + 1)
    return out
