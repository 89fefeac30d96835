"""Sentences, BM25 terms and the `retrieve` baseline: the text side of choosing what to read.

Below eval/, compile/ and runtime/ (all three import it): an indexed cartridge's pages are
these sentences (compile/index.py), its selector scores them with these terms
(runtime/memory/select.py), and the `retrieve` baseline, what a user would do instead of
compiling a long document, reads them as text (eval/).

For each question, the document's sentences are ranked by BM25 (rank_bm25's Okapi scorer)
against the question, and the best ones that fit the budget, as many tokens as the
cartridge has KV entries, go into the prompt in document order. Same KV budget as the
cartridge and `truncate`, but chosen with the question in hand, which a cartridge cannot do.
"""

from __future__ import annotations

import re

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def chunks_of(text: str) -> list[str]:
    """Sentences (cut at sentence ends and blank lines), the unit retrieval picks."""
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def bm25_scores(chunks: list[str], question: str) -> list[float]:
    from rank_bm25 import BM25Okapi

    return list(BM25Okapi([terms(c) or [""] for c in chunks]).get_scores(terms(question)))


def retrieve(text: str, question: str, budget: int, count_tokens, floor: int = 0, scores=bm25_scores) -> str:
    """The best-scoring sentences for `question` that fit `budget` tokens together, in
    document order. A best sentence longer than the whole budget is kept whole up to `floor`
    tokens and cut to max(budget, floor) by words past it, and a document of at most `floor`
    tokens is kept whole (the floor of an indexed read, runtime/memory/paged.py).
    `count_tokens(text) -> int` is the model's tokenizer; `scores(sentences, question)` ranks
    them (BM25, or runtime/dense.py's embeddings)."""
    chunks = chunks_of(text)
    if not chunks or budget <= 0:
        return ""
    costs = [count_tokens(c) for c in chunks]
    if sum(costs) <= max(budget, floor):
        return " ".join(chunks)
    scores = scores(chunks, question)
    ranked = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    chosen, used = [], 0
    for i in ranked:
        cost = costs[i]
        if used + cost <= budget:
            chosen.append(i)
            used += cost
        elif not chosen:  # the best sentence alone is over budget: whole up to the floor, else its first words
            if cost <= floor:
                return chunks[i]
            room = max(budget, floor)
            words = chunks[i].split()
            while words and count_tokens(" ".join(words)) > room:
                words = words[: max(1, len(words) * room // max(count_tokens(" ".join(words)), 1) - 1)]
                if len(words) == 1 and count_tokens(words[0]) > room:
                    words = []
            return " ".join(words)
        if used >= budget:
            break
    return " ".join(chunks[i] for i in sorted(chosen))
