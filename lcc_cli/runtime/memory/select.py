"""Selectors: how an indexed read scores candidate pages for a question.

A selector registers like a compile method (compile/base.py): a name (what `--selector` and
`ReadConfig.selector` take), the index tensors a cartridge must store for it, and a scoring
function. The paged reader and the library both look selectors up here; neither knows any
by name. Scores compare across cartridges: one BM25 over every page asked, one attention
softmax over all their summaries.

The scoring function gets the memory (`Scorer`: text scores and attention scores over the
candidate pages, each memory computing them its own way) and the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ...retrieval import terms

RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): ranks, not raw scores, are fused


class Scorer(Protocol):
    def text_scores(self, question: str, pages: list) -> list[float]:
        """Higher is better: BM25 over the pages' text (or the library index's own ranking)."""

    def attention_scores(self, question: str, pages: list) -> list[float]:
        """The question's attention mass on each page's mean key."""


@dataclass(frozen=True)
class Selector:
    name: str
    needs: tuple[str, ...]  # index summaries the cartridges must store ("key_mean")
    score: Callable[[Scorer, str, list], list[float]]


SELECTORS: dict[str, Selector] = {}


def register(name: str, needs: tuple[str, ...] = ()):
    def add(fn):
        SELECTORS[name] = Selector(name, needs, fn)
        return fn

    return add


def selector(name: str) -> Selector:
    from ...errors import UsageError

    if name not in SELECTORS:
        raise UsageError(f"unknown selector {name!r}; one of {', '.join(SELECTORS)}", field="selector")
    return SELECTORS[name]


@register("bm25")
def _bm25(memory: Scorer, question: str, pages: list) -> list[float]:
    return memory.text_scores(question, pages)


# Refuted for SmolLM2-135M (its attention finds the answer's sentence 0.10-0.32 of the time;
# shared/DESIGN.md 4d), kept for models whose attention may retrieve.
@register("attention", needs=("key_mean",))
def _attention(memory: Scorer, question: str, pages: list) -> list[float]:
    return memory.attention_scores(question, pages)


@register("fusion", needs=("key_mean",))
def _fusion(memory: Scorer, question: str, pages: list) -> list[float]:
    return fused(memory.text_scores(question, pages), memory.attention_scores(question, pages))


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

    prompt = loaded.prompter.query_ids(question)
    with loaded.family.capture_queries(loaded.model) as captured, slot_biases(loaded.model, buffer.bias):
        with torch.inference_mode():
            forward(loaded.model, make_cache(buffer.cache_layers()), buffer.first_query_position,
                    input_ids=torch.tensor([prompt], device=loaded.device), logits_to_keep=1)
    heads = loaded.model.config.num_attention_heads
    return [q[0].float().reshape(len(prompt), heads, loaded.facts.head_dim).transpose(0, 1) for q in captured]


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
