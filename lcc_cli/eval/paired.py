"""Two conditions of one `lcc eval` run compared question by question.

A side is a method label (its `cartridge` rows) or a baseline that has a ratio (`truncate`,
`retrieve`). Per ratio: each side's mean "contains" and F1 (absolute and relative to full
context), the difference B - A with a 95% interval from a bootstrap over documents
(questions about one document are not independent), and on how many questions B beat or
lost to A. Paired differences separate two methods on far fewer questions than two
independent means do.
"""

from __future__ import annotations

import random
from collections import defaultdict

METRICS = ("contains", "f1")
# Baselines run once per KV budget at a ratio (eval/run.py): the same budget as text, read by
# the plain model (`_words`: with the best plain prompt; `_dense`: chosen by embeddings;
# `_prefix`: with the reading prefix)
BASELINES = ("truncate", "retrieve", "retrieve_words", "retrieve_dense", "retrieve_prefix")


def _side(rows: list[dict], label: str, ratio: float, budgets: dict | None = None) -> dict:
    """(doc, qid) -> row. A baseline ran once per KV budget met at a ratio (methods can keep
    a different number of entries); `budgets` (doc -> the other side's budget) picks the run
    at the same budget. Rows written before budgets were recorded have none and match any, on
    either side (a document is never dropped from the comparison for lack of one)."""
    if label in BASELINES:
        return {(r["doc"], r["qid"]): r for r in rows if r["condition"] == label and r["ratio"] == ratio
                and (budgets is None or r.get("budget") is None or budgets.get(r["doc"]) is None
                     or r["budget"] == budgets[r["doc"]])}
    return {(r["doc"], r["qid"]): r for r in rows
            if r["condition"] == "cartridge" and r["ratio"] == ratio and r["method"] == label}


def _baselines_at_one_budget(rows: list[dict], a_label: str, b_label: str, ratio: float) -> tuple[dict, dict]:
    """Two baselines, each run once per budget: compared at the smallest budget each document
    has (the same for both, since both ran at every cartridge's budget)."""
    smallest: dict = {}
    for r in rows:
        if r["condition"] == a_label and r["ratio"] == ratio and r.get("budget") is not None:
            smallest[r["doc"]] = min(smallest.get(r["doc"], r["budget"]), r["budget"])
    budgets = smallest or None
    return _side(rows, a_label, ratio, budgets), _side(rows, b_label, ratio, budgets)


def _budgets(side: dict) -> dict:
    return {doc: r.get("budget") for (doc, _), r in side.items()}


def compare(results: dict, a_label: str, b_label: str, resamples: int = 5000) -> dict:
    """`results`: an eval's results.json. Returns {"8x": {...}, ...} for every ratio both
    sides have."""
    rows = [r for d in results["documents"] for r in d["rows"]]
    full = {(r["doc"], r["qid"]): r for r in rows if r["condition"] == "full"}
    out = {}
    for ratio in sorted({r["ratio"] for r in rows if r["condition"] == "cartridge"}):
        a, b = _side(rows, a_label, ratio), _side(rows, b_label, ratio)
        if a_label in BASELINES and b_label not in BASELINES:
            a = _side(rows, a_label, ratio, _budgets(b))
        elif b_label in BASELINES and a_label not in BASELINES:
            b = _side(rows, b_label, ratio, _budgets(a))
        elif a_label in BASELINES and b_label in BASELINES:
            a, b = _baselines_at_one_budget(rows, a_label, b_label, ratio)
        keys = sorted(set(a) & set(b))
        if not keys:
            continue
        by_doc = defaultdict(list)
        for k in keys:
            by_doc[k[0]].append(k)
        docs = sorted(by_doc)

        def diff(ks, metric):
            return sum(b[k][metric] - a[k][metric] for k in ks) / len(ks)

        rng = random.Random(0)
        boots = {m: sorted(diff([k for d in rng.choices(docs, k=len(docs)) for k in by_doc[d]], m)
                           for _ in range(resamples)) for m in METRICS}
        row = {"questions": len(keys), "documents": len(docs)}
        for m in METRICS:
            total_full = sum(full[k][m] for k in keys if k in full)
            mean_a = sum(a[k][m] for k in keys) / len(keys)
            mean_b = sum(b[k][m] for k in keys) / len(keys)
            lo, hi = boots[m][int(0.025 * resamples)], boots[m][int(0.975 * resamples) - 1]
            row[m] = {a_label: round(mean_a, 4), b_label: round(mean_b, 4), "diff": round(diff(keys, m), 4),
                      "diff_ci95": [round(lo, 4), round(hi, 4)],
                      f"{a_label} vs full": round(mean_a * len(keys) / total_full, 3) if total_full else None,
                      f"{b_label} vs full": round(mean_b * len(keys) / total_full, 3) if total_full else None}
        row["contains: B better / worse"] = [sum(b[k]["contains"] > a[k]["contains"] for k in keys),
                                             sum(b[k]["contains"] < a[k]["contains"] for k in keys)]
        out[f"{ratio:g}x"] = row
    return out


def against_baselines(results: dict, resamples: int = 2000) -> list[dict]:
    """Every method against every baseline the run has, per ratio: rows for the report."""
    rows = [r for d in results["documents"] for r in d["rows"]]
    methods = sorted({r["method"] for r in rows if r["condition"] == "cartridge"})
    present = [b for b in BASELINES if any(r["condition"] == b for r in rows)]
    out = []
    for method in methods:
        for base in present:
            for ratio, row in compare(results, base, method, resamples).items():
                c = row["contains"]
                out.append({"method": method, "baseline": base, "ratio": ratio, "questions": row["questions"],
                            "documents": row["documents"], "method_contains": c[method], "baseline_contains": c[base],
                            "diff": c["diff"], "ci95": c["diff_ci95"],
                            "better_worse": row["contains: B better / worse"]})
    return out
