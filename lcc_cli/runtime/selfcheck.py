"""A cartridge's self-check: at compile time the model asks itself a few questions about the
document, answers each with the document in the prompt and with the cartridge, and the
manifest records how much the two answers agree (`lcc inspect` shows it).

It needs no gold answers and no held-out data, so it can be computed for any document a user
compiles: a cheap, honest signal that a cartridge lost what its document said. How well it
predicts measured retention is in bench/results/selfcheck/ (bench/selfcheck.py).
"""

from __future__ import annotations

import torch

from ..buffer import Buffer
from ..config import AskConfig
from .reading import Row, View, answer_rows

# Each asks for a different kind of fact, so that a few questions do not all land on the
# document's first sentence.
QUESTION_INSTRUCTIONS = (
    "Write one short question about a person or group named in the document. Reply with the question only.",
    "Write one short question about a number or date in the document. Reply with the question only.",
    "Write one short question about a place in the document. Reply with the question only.",
    "Write one short question about what happened, according to the document. Reply with the question only.",
    "Write one short question about why something happened in the document. Reply with the question only.",
    "Write one short question about how something works in the document. Reply with the question only.",
    "Write one short question about the document's last paragraph. Reply with the question only.",
    "Write one short question about the document's first paragraph. Reply with the question only.",
)
MAX_QUESTIONS = len(QUESTION_INSTRUCTIONS)
# Positions a self-check needs after the document: an instruction or a question (cut to 300
# characters) and the longest reply (40 tokens).
WINDOW_MARGIN = 256


def self_check(loaded, text: str, buffer: Buffer, questions: int, max_new_tokens: int = 24, prefix=None) -> dict:
    """{"questions", "agreement" (mean token F1 between the two answers, 0..1), "examples"}, or
    {"questions": 0, "agreement": None, "skipped": why} for a document past the model's window."""
    from ..scoring import token_f1

    p = loaded.prompter
    context = p.context_ids(text)
    limit = loaded.facts.max_positions
    if limit and len(context) + WINDOW_MARGIN > limit:
        # the reference answers read the whole document in the prompt: past the window there
        # is nothing to compare with (and the compile must not fail for a check it asked for)
        return {"questions": 0, "agreement": None,
                "skipped": f"the document ({len(context):,} tokens) does not fit the model's "
                           f"{limit:,}-position window beside a question"}
    document = View.text(context)
    asked = answer_rows(loaded, [Row(document, p.query_ids(q)) for q in QUESTION_INSTRUCTIONS[:questions]],
                        AskConfig(max_new_tokens=40))  # the model writes questions: no reading prefix
    texts = []
    for a in asked:
        line = a.text.splitlines()
        texts.append((line[0] if line else "").strip()[:300] or "What is the document about?")
    cfg = AskConfig(max_new_tokens=max_new_tokens)
    with_doc = answer_rows(loaded, [Row(document, p.query_ids(q), q) for q in texts], cfg, prefix)
    cartridge = View(buffer, key=("cartridge",))
    with_cart = answer_rows(loaded, [Row(cartridge, p.query_ids(q), q) for q in texts], cfg, prefix)
    scores = [token_f1(c.text, [d.text]) if d.text.strip() else float(not c.text.strip())
              for d, c in zip(with_doc, with_cart)]
    return {"questions": len(texts), "agreement": round(sum(scores) / len(scores), 4),
            "examples": [{"q": q, "document": d.text[:200], "cartridge": c.text[:200]}
                         for q, d, c in zip(texts[:3], with_doc, with_cart)]}
