"""SQuAD-style answer scoring: exact match, token F1, and "contains".

Normalisation follows the official SQuAD v1.1 evaluation: lower-case, strip punctuation,
drop the articles a/an/the, collapse whitespace. Each score is the max over gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(g) for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    return max((_f1(normalize(prediction).split(), normalize(g).split()) for g in golds), default=0.0)


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, golds: list[str]) -> float:
    p = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in p for g in golds))


def score(prediction: str, golds: list[str]) -> dict:
    return {"em": exact_match(prediction, golds), "f1": token_f1(prediction, golds),
            "contains": contains(prediction, golds)}
