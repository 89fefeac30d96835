"""How well a cartridge's self-check predicts its measured retention (issue 18, item 8).

    python bench/selfcheck.py DATA.jsonl EVAL_OUT [--questions 4] [-o bench/results/selfcheck]

EVAL_OUT is an `lcc eval --out` folder (its cartridges/ cache, docs/ results and
results.json). For every cached cartridge of a finished document: the self-check agreement
(lcc_cli/runtime/selfcheck.py) against that document's measured F1 and "contains" for the
same method and ratio, absolute and relative to full context. Reports Spearman rank
correlations over cartridges, and the per-point table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from lcc_cli.api import RunOptions, load
from lcc_cli.config import CompileConfig
from lcc_cli.format.cartridge import load_cartridge
from lcc_cli.runtime.selfcheck import self_check


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    return statistics.correlation(ra, rb) if len(a) > 2 and len(set(ra)) > 1 and len(set(rb)) > 1 else float("nan")


def method_label(manifest: dict, methods: list[dict]) -> str | None:
    defaults = CompileConfig().to_dict()
    got = {**defaults, **manifest["compile"]}
    got.pop("ratio")
    for m in methods:
        want = {**defaults, **m["settings"]}
        want.pop("ratio", None)
        if m["compiler"][0] == manifest["compiler"].get("name") and all(got[k] == want[k] for k in want
                                                                          if k not in ("self_check", "segment_tokens")):
            return m["label"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("eval_out", type=Path)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("-o", "--out", type=Path, default=Path("bench/results/selfcheck"))
    args = ap.parse_args()
    texts = {}
    for line in args.data.read_text().splitlines():
        row = json.loads(line)
        texts[hashlib.sha256(row["context"].encode()).hexdigest()[:12]] = row["context"]
    methods = json.loads((args.eval_out / "results.json").read_text())["meta"]["methods"]
    loaded = load(RunOptions())
    points = []
    for doc_file in sorted((args.eval_out / "docs").glob("*.json")):
        doc = json.loads(doc_file.read_text())
        rows = doc["rows"]
        full = [r for r in rows if r["condition"] == "full"]
        sha = doc_file.stem.split("-")[-2]  # results are named ID-DOCSHA-SETTINGS.json
        if sha not in texts or not full:
            continue
        for cart_path in sorted((args.eval_out / "cartridges").glob(f"{sha}-*.lcc")):
            cart = load_cartridge(cart_path)
            label, ratio = method_label(cart.manifest, methods), cart.manifest["source"]["ratio"]
            mine = [r for r in rows if r["condition"] == "cartridge" and r["method"] == label and r["ratio"] == ratio]
            if not label or not mine:
                continue
            check = self_check(loaded, texts[sha], cart.buffer, args.questions)
            f1, hit = statistics.mean(r["f1"] for r in mine), statistics.mean(r["contains"] for r in mine)
            f1_full = statistics.mean(r["f1"] for r in full if r["qid"] in {m["qid"] for m in mine})
            points.append({"doc": doc["id"], "method": label, "ratio": ratio, "agreement": check["agreement"],
                           "f1": f1, "contains": hit, "f1_vs_full": f1 / f1_full if f1_full else None,
                           "questions": len(mine)})
            print(json.dumps(points[-1]))
    rel = [p for p in points if p["f1_vs_full"] is not None]
    summary = {"cartridges": len(points), "self_check_questions": args.questions,
               "spearman_agreement_f1": spearman([p["agreement"] for p in points], [p["f1"] for p in points]),
               "spearman_agreement_contains": spearman([p["agreement"] for p in points],
                                                       [p["contains"] for p in points]),
               "spearman_agreement_f1_vs_full": spearman([p["agreement"] for p in rel], [p["f1_vs_full"] for p in rel])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "points": points}, indent=1) + "\n")
    lines = ["# Self-check against measured retention", "",
             f"`python bench/selfcheck.py {args.data} {args.eval_out} --questions {args.questions}`, one run.", "",
             "| measure | Spearman ρ with self-check agreement |", "|---|---|"]
    for key in ("f1", "contains", "f1_vs_full"):
        lines.append(f"| per-document {key.replace('_', ' ')} of the cartridge | "
                     f"{summary['spearman_agreement_' + key]:.2f} |")
    lines += ["", f"{len(points)} cartridges (document x method x ratio), {args.questions} self-asked questions each.",
              "", "| document | method | ratio | agreement | F1 | contains | questions |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['doc']} | {p['method']} | {p['ratio']:g} | {p['agreement']:.2f} | {p['f1']:.3f} | "
              f"{p['contains']:.2f} | {p['questions']} |" for p in points]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
