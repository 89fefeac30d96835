"""Write lcc_cli/data/auto.json, the table behind `--compiler auto`, from `lcc eval` results.

    python bench/auto_table.py bench/results/long/results.json [more results.json ...]

Two rows. Any model without a pretrained compiler (`--model`): for each quality preset's
compile budget (prefill-equivalents per document, below), the method that needs no trained
compiler with the highest mean "contains" over every (document set, ratio) it was measured
on, weighted by questions. The embedded model: its pretrained compiler at the same preset
(the shipped compiler trained on the paragraph bench's articles, so no bench here can rank
it fairly against the others; a retrained one that passes the A/B replaces this rule). The
table names the results it was made from; rerun this after the bench to refresh it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lcc_cli.config import CompileConfig

BUDGETS = {"fast": 3.0, "balanced": 10.0, "best": 100.0}  # prefill-equivalents per document
UNTRAINED = ("am", "truncate", "optimise")  # compilers that work for any model
# Differences in "contains" below this are within the noise of a few hundred questions
# (a 95% interval on a proportion near 0.2 with n = 300 is about ±0.045; paired, about half).
TIE = 0.02
OUT = Path(__file__).resolve().parents[1] / "lcc_cli" / "data" / "auto.json"


def measured(paths: list[Path]) -> dict[str, dict]:
    """label -> {compiler, settings, hits and n (questions), pe (worst mean over sets)}, for
    the methods measured in every results file: a method seen on one set only cannot be
    ranked against one seen on both. Methods are matched by compiler and settings, not label."""
    out: dict[str, dict] = {}
    labels: dict[str, str] = {}
    for path in paths:
        r = json.loads(path.read_text())
        methods = {m["label"]: m for m in r["meta"]["methods"]}
        costs = {(c["method"], c["ratio"]): c["prefill_equivalents"] for c in r["summary"]["costs"]}
        for c in r["summary"]["conditions"]:
            if c["condition"] != "cartridge" or c["method"] not in methods:
                continue
            m = methods[c["method"]]
            full = {**CompileConfig().to_dict(), **m["settings"]}  # results older than a setting lack it
            same = json.dumps([m["compiler"][0], {k: v for k, v in full.items() if k != "ratio"}], sort_keys=True)
            label = labels.setdefault(same, c["method"])
            row = out.setdefault(label, {"compiler": m["compiler"][0], "settings": m["settings"],
                                         "hits": 0.0, "n": 0, "pe": 0.0, "sources": set()})
            row["hits"] += c["contains"] * c["n"]
            row["n"] += c["n"]
            row["pe"] = max(row["pe"], costs.get((c["method"], c["ratio"]), float("inf")))
            row["sources"].add(str(path))
    return {label: row for label, row in out.items() if len(row["sources"]) == len(set(map(str, paths)))}


def pick(rows: dict[str, dict], budget: float, compilers=None) -> tuple[str, dict] | None:
    """The best method within the budget; methods within TIE of the best count as tied (the
    samples cannot separate them) and the cheapest of those wins. Nothing within the budget:
    the cheapest method measured."""
    ok = [(label, r) for label, r in rows.items() if compilers is None or r["compiler"] in compilers]
    inside = [x for x in ok if x[1]["pe"] <= budget]
    if not inside:
        return min(ok, key=lambda x: x[1]["pe"], default=None)
    best = max(x[1]["hits"] / x[1]["n"] for x in inside)
    return min((x for x in inside if x[1]["hits"] / x[1]["n"] >= best - TIE), key=lambda x: x[1]["pe"])


def entry(label: str, row: dict) -> dict:
    defaults = CompileConfig().to_dict()
    settings = {k: v for k, v in row["settings"].items() if k in defaults and v != defaults[k] and k != "ratio"}
    return {"compiler": row["compiler"], "settings": settings, "method": label,
            "contains": round(row["hits"] / row["n"], 4), "questions": row["n"],
            "prefill_equivalents": round(row["pe"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = measured(args.results)
    table = {"made_by": "python bench/auto_table.py " + " ".join(str(p) for p in args.results),
             "budgets": BUDGETS, "rows": {}}
    table["rows"]["pretrained"] = {q: {"compiler": "pretrained", "quality": q, "settings": {}} for q in BUDGETS}
    table["rows"]["any_model"] = {}
    for quality, budget in BUDGETS.items():
        found = pick(rows, budget, UNTRAINED)
        if found is None:
            raise SystemExit(f"no measured method for any model (compilers {', '.join(UNTRAINED)})")
        table["rows"]["any_model"][quality] = entry(*found)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps(table["rows"], indent=1))


if __name__ == "__main__":
    main()
