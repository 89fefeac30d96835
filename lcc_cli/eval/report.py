"""Turn `lcc eval` document results into a summary, report.md, results.json and a plot.

Every score "vs full" divides by the full-context score on the *same questions* (a method
run on a subset of documents is compared with full context on that subset), and carries a
95% bootstrap interval over questions, so that differences can be read against the noise.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from ..format.fsio import atomic_write
from ..scoring import normalize, token_f1

METRICS = ("em", "f1", "contains")
_ORDER = {"full": 0, "none": 1, "truncate": 2, "retrieve": 3, "cartridge": 4, "cartridge_routed": 5,
          "cartridge_v1_layout": 6, "cartridge_bf16": 7, "full_article": 8, "composed": 9, "composed_overlap": 10}
# Issue 9's targets: contains vs full at a compile budget, per ratio.
TARGETS = [(16.0, 10, 0.6), (16.0, 100, 0.8), (8.0, 100, 0.9)]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _ratio_ci(pairs: list[tuple[float, float]], resamples: int = 1000) -> tuple[float, float] | None:
    """95% bootstrap interval of mean(a) / mean(b) over paired questions."""
    if len(pairs) < 2:
        return None
    rng = random.Random(0)
    stats = []
    for _ in range(resamples):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        den = sum(b for _, b in sample)
        if den:
            stats.append(sum(a for a, _ in sample) / den)
    if not stats:
        return None
    stats.sort()
    return stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]


def _at_budgets(results: list[dict]) -> list[dict]:
    """Every row, with the baseline rows (truncate, retrieve) of a ratio where methods kept
    different numbers of entries labelled by the methods they were run to match: "@a/b" holds,
    for every document a and b ran on, the run at their budget (a and b met the same budgets
    on the same documents). Averaging a baseline over several budgets would compare it with
    none of them. Where every document had one budget at a ratio, its rows keep no label."""
    budgets: dict[float, dict[str, dict]] = {}  # ratio -> method -> doc -> slots
    for doc in results:
        for c in doc.get("compiles", []):
            budgets.setdefault(c["ratio"], {}).setdefault(c["method"], {})[doc["id"]] = c["slots"]
    groups: dict[float, list[tuple[str, dict]]] = {}  # ratio -> [(label, doc -> slots)], where labels are needed
    for ratio, by_method in budgets.items():
        per_doc: dict[str, set] = {}
        for mapping in by_method.values():
            for d, k in mapping.items():
                per_doc.setdefault(d, set()).add(k)
        if all(len(ks) == 1 for ks in per_doc.values()):
            continue
        alike: dict[tuple, list[str]] = {}
        for method, mapping in sorted(by_method.items()):
            alike.setdefault(tuple(sorted(mapping.items())), []).append(method)
        groups[ratio] = [("@" + "/".join(ms), dict(key)) for key, ms in alike.items()]
    out = []
    for doc in results:
        for r in doc["rows"]:
            if r["condition"] in ("truncate", "retrieve") and r.get("budget") is not None and r["ratio"] in groups:
                out += [{**r, "method": label} for label, mapping in groups[r["ratio"]]
                        if mapping.get(r["doc"]) == r["budget"]]
            else:
                out.append(r)
    return out


def _baseline_for(conditions: list[dict], condition: str, ratio: float, method: str | None) -> dict | None:
    """The baseline row that matches `method`'s budget at `ratio` (the unlabelled one when
    every method met the same budgets; the first labelled one when no method is given; `none`,
    which has no ratio, at any)."""
    here = [c for c in conditions if c["condition"] == condition and c["ratio"] in (ratio, None)]
    return next((c for c in here if c["method"] is None or method is None
                 or method in c["method"][1:].split("/")), None)


def summarize(results: list[dict], kv_bytes_per_position: int) -> dict:
    rows = _at_budgets(results)
    baseline = {(r["condition"], r["doc"], r["question"]): r for r in rows if r["condition"] in ("full", "full_article")}
    conditions = []
    keys = sorted({(r["condition"], r.get("method"), r["ratio"]) for r in rows},
                  key=lambda k: (_ORDER.get(k[0], 99), k[2] or 0, str(k[1])))
    for condition, method, ratio in keys:
        sel = [r for r in rows if (r["condition"], r.get("method"), r["ratio"]) == (condition, method, ratio)]
        ref_condition = "full_article" if condition.startswith("composed") or condition == "full_article" else "full"
        refs = [baseline.get((ref_condition, r["doc"], r["question"])) for r in sel]
        refs = [x for x in refs if x is not None]
        c = {"condition": condition, "method": method, "ratio": ratio, "n": len(sel),
             **{m: _mean(r[m] for r in sel) for m in METRICS},
             "ttft": _mean(r["ttft"] for r in sel), "seconds": _mean(r["seconds"] for r in sel),
             "kv_positions": _mean(r["kv_positions"] for r in sel)}
        for m in METRICS:
            full = _mean(x[m] for x in refs)
            c[f"{m}_vs_full"] = c[m] / full if full else None
        if len(refs) == len(sel):
            c["contains_vs_full_ci"] = _ratio_ci([(r["contains"], x["contains"]) for r, x in zip(sel, refs)])
        conditions.append(c)
    costs = _costs(results, conditions, kv_bytes_per_position)
    return {"documents": sum(1 for d in results if not d["id"].startswith("article:")),
            # by id: a paragraph can carry the same question text twice
            "questions": len({(r["doc"], r.get("qid") or r["question"]) for r in rows}),
            "conditions": conditions, "costs": costs, "general": _general(results),
            "targets": _targets(conditions, costs)}


def _costs(results, conditions, kv_bytes_per_position) -> list[dict]:
    # a run without baselines (an A/B's second half) has no full-context row: its fields are None
    full = next((c for c in conditions if c["condition"] == "full"), None)
    out = []
    entries = [c for d in results for c in d.get("compiles", [])]
    for method, ratio in sorted({(c["method"], c["ratio"]) for c in entries}, key=lambda k: (k[1], k[0])):
        sel = [c for c in entries if (c["method"], c["ratio"]) == (method, ratio)]
        cart = next(c for c in conditions if (c["condition"], c["method"], c["ratio"]) == ("cartridge", method, ratio))
        compile_s = _mean(c["seconds"] for c in sel)
        saving = full["seconds"] - cart["seconds"] if full else None
        out.append({
            "method": method, "ratio": ratio, "documents": len(sel), "slots": _mean(c["slots"] for c in sel),
            "compile_seconds": compile_s, "prefill_seconds": _mean(c["prefill_seconds"] for c in sel),
            "prefill_equivalents": _mean(c["prefill_equivalents"] for c in sel),
            "file_bytes": _mean(c.get("bytes") for c in sel),
            "ttft_full": full and full["ttft"], "ttft_cartridge": cart["ttft"],
            "ttft_ratio": full["ttft"] / cart["ttft"] if full and cart["ttft"] else None,
            "kv_bytes_full": full["kv_positions"] * kv_bytes_per_position if full else None,
            "kv_bytes_cartridge": cart["kv_positions"] * kv_bytes_per_position,
            "kv_ratio": full["kv_positions"] / cart["kv_positions"] if full else None,
            # Compiling pays off once the prefill it saves per question adds up to its cost.
            "break_even_questions": compile_s / saving if saving is not None and saving > 0 else None,
            "contains_vs_full": cart["contains_vs_full"], "contains_vs_full_ci": cart.get("contains_vs_full_ci"),
        })
    return out


def _targets(conditions, costs) -> list[dict]:
    """For each target row: the best method within the compile budget, and truncate beside it."""
    out = []
    for ratio, budget, goal in TARGETS:
        within = [c for c in costs if c["ratio"] == ratio and c["prefill_equivalents"] is not None
                  and c["prefill_equivalents"] <= budget and c["contains_vs_full"] is not None]
        best = max(within, key=lambda c: c["contains_vs_full"], default=None)
        trunc = _baseline_for(conditions, "truncate", ratio, best and best["method"])
        out.append({"ratio": ratio, "budget_pe": budget, "goal": goal,
                    "method": best and best["method"], "pe": best and best["prefill_equivalents"],
                    "contains_vs_full": best and best["contains_vs_full"],
                    "ci": best and best.get("contains_vs_full_ci"),
                    "truncate_vs_full": trunc and trunc["contains_vs_full"],
                    "met": bool(best and best["contains_vs_full"] >= goal)})
    return out


def _general(results) -> list[dict]:
    pairs = [p for d in results for p in d.get("general", [])]
    out = []
    for method, ratio in sorted({(p["method"], p["ratio"]) for p in pairs}, key=lambda k: (k[1], k[0])):
        sel = [p for p in pairs if (p["method"], p["ratio"]) == (method, ratio)]
        out.append({"method": method, "ratio": ratio, "n": len(sel),
                    "match_rate": _mean(float(normalize(p["none"]) == normalize(p["cartridge"])) for p in sel),
                    "token_f1": _mean(token_f1(p["cartridge"], [p["none"]]) for p in sel)})
    return out


def write_report(results: list[dict], out: Path, meta: dict) -> dict:
    from .paired import against_baselines

    summary = summarize(results, meta["kv_bytes_per_position"])
    summary["paired"] = against_baselines({"documents": results})
    payload = {"meta": meta, "summary": summary, "documents": results}
    atomic_write(out / "results.json", json.dumps(payload, indent=1).encode())
    plot = _plot(summary, out / "frontier.png")
    atomic_write(out / "report.md", render_markdown(summary, meta, plot).encode())
    return summary


def _fmt(v, digits=3):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(ci) -> str:
    return f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "–"


def render_markdown(summary: dict, meta: dict, plot: str | None) -> str:
    methods = "\n".join(f"- `{m['label']}`: compiler `{m['compiler'][0]}`"
                        + (f" (`{m['compiler'][1]}`)" if m["compiler"][1] else "")
                        + f", steps {m['settings'].get('steps')}, lr {m['settings'].get('lr')}"
                        + (f", one document in {m['stride']}" if m["stride"] > 1 else "")
                        for m in meta.get("methods", []))
    lines = ["# lcc eval report", "",
             f"Model `{meta['model']}` (fingerprint `{meta['fingerprint'][:16]}`), data `{meta['data']}`, "
             f"{summary['documents']} documents, {summary['questions']} questions, machine: {meta['machine']}. "
             f"lcc {meta['lcc_version']}, {meta['finished']}.", "", "Methods:", "", methods, ""]
    prompt = meta.get("prompt")
    if prompt:  # what the reader saw: every condition reads this system turn; `_words` conditions add the words
        lines += [f"Prompt: system turn `{prompt['system'][:60]}…`; answer formats "
                  + ", ".join(f"`{k}` = `{v.strip() or '(none)'}`" for k, v in prompt["answer_formats"].items())
                  + f". Reading prefix: `{meta.get('reading_prefix') or 'none'}` (the methods' reads; the baselines "
                    "read without it unless named `*_prefix`).", ""]
    if summary.get("targets"):
        lines += ["## Targets", "", targets_table(summary), "",
                  "Best method whose mean compile cost is within the budget; `contains` relative to full context "
                  "on the same questions, with a 95% bootstrap interval over questions.", ""]
    lines += ["## Quality", "", score_table(summary), "",
              "`*_vs_full` divides by the full-context score on the same questions (`full_article` for the "
              "composed conditions). `truncate` gives the model the first K document tokens, K = the cartridge's "
              "slots (the same KV budget); `retrieve` the question's best BM25 sentences, K tokens at most. "
              "Where methods kept different numbers of entries at a ratio, a baseline's method `@M/N` is its run "
              "at the budget of methods M and N, on the documents they ran on. "
              "`composed` answers each article's questions from all its paragraphs' "
              "cartridges side by side; `composed_overlap` with every cartridge at its own positions. "
              "`cartridge_v1_layout` reads the same cartridges with the buffer placed after its text (the v1 "
              "layout); `cartridge_bf16` reads them after a round trip through bfloat16.", "",
              *paired_section(summary),
              "## Cost", "", cost_table(summary), "",
              "Prefill equivalents (PE): compile wall seconds / seconds of one forward pass over the document "
              "(median of 5, timed right before each compile). Break-even: compile seconds / ask seconds saved "
              "per question (none if the cartridge saves nothing).", ""]
    if summary["general"]:
        lines += ["## General ability", "",
                  "Held-out generic instructions asked with the cartridge and with no document; how often the "
                  "answers match after normalisation, and their token F1.", "",
                  "| method | ratio | probes | match rate | token F1 |", "|---|---|---|---|---|"]
        lines += [f"| {g['method']} | {g['ratio']:g} | {g['n']} | {_fmt(g['match_rate'])} | {_fmt(g['token_f1'])} |"
                  for g in summary["general"]]
        lines.append("")
    if plot:
        lines += [f"![contains vs compile cost]({plot})", ""]
    return "\n".join(lines)


def paired_section(summary: dict) -> list[str]:
    if not summary.get("paired"):
        return []
    head = ("| method | against | ratio | questions (docs) | method contains | baseline contains | difference "
            "(95% CI) | better / worse |\n|---|---|---|---|---|---|---|---|")
    body = [f"| {p['method']} | {p['baseline']} | {p['ratio']} | {p['questions']} ({p['documents']}) | "
            f"{p['method_contains']:.3f} | {p['baseline_contains']:.3f} | {p['diff']:+.3f} "
            f"({p['ci95'][0]:+.3f} to {p['ci95'][1]:+.3f}) | {p['better_worse'][0]} / {p['better_worse'][1]} |"
            for p in summary["paired"]]
    return ["## Paired against the baselines", "", head, *body, "",
            "Absolute \"contains\" on the same questions; the interval is a bootstrap over documents. "
            "`retrieve` puts the question's best BM25 sentences of the document in the prompt, as many tokens "
            "as the cartridge has entries.", ""]


def targets_table(summary: dict) -> str:
    head = ("| ratio | budget | target | best method | PE | contains vs full (95% CI) | truncate vs full | met |\n"
            "|---|---|---|---|---|---|---|---|")
    body = [f"| {t['ratio']:g}x | ≤ {t['budget_pe']} PE | ≥ {t['goal']} | {t['method'] or '–'} | {_fmt(t['pe'], 1)} | "
            f"{_fmt(t['contains_vs_full'], 2)} ({_ci(t['ci'])}) | {_fmt(t['truncate_vs_full'], 2)} | "
            f"{'yes' if t['met'] else 'no'} |" for t in summary["targets"]]
    return "\n".join([head, *body])


def score_table(summary: dict) -> str:
    head = ("| condition | method | ratio | n | EM | F1 | contains | F1 vs full | contains vs full (95% CI) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    body = [f"| {c['condition']} | {c['method'] or '–'} | {c['ratio'] if c['ratio'] is not None else '–'} | {c['n']} | "
            f"{_fmt(c['em'])} | {_fmt(c['f1'])} | {_fmt(c['contains'])} | {_fmt(c['f1_vs_full'], 2)} | "
            f"{_fmt(c['contains_vs_full'], 2)} ({_ci(c.get('contains_vs_full_ci'))}) |" for c in summary["conditions"]]
    return "\n".join([head, *body])


def cost_table(summary: dict) -> str:
    head = ("| method | ratio | docs | slots | compile s | PE | file bytes | TTFT full / cart (s) | KV ratio | "
            "break-even questions |\n|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {c['method']} | {c['ratio']:g} | {c['documents']} | {_fmt(c['slots'], 1)} | "
            f"{_fmt(c['compile_seconds'], 1)} | {_fmt(c['prefill_equivalents'], 1)} | {_fmt(c['file_bytes'], 0)} | "
            f"{_fmt(c['ttft_full'])} / {_fmt(c['ttft_cartridge'])} | {_fmt(c['kv_ratio'], 1)} | "
            f"{_fmt(c['break_even_questions'], 0)} |" for c in summary["costs"]]
    return "\n".join([head, *body])


def _plot(summary: dict, path: Path) -> str | None:
    """'contains' vs full against compile cost (log x), one panel per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = summary["costs"]
    if not costs:
        return None
    ratios = sorted({c["ratio"] for c in costs})
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4.2), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        here = [c for c in costs if c["ratio"] == ratio and c["prefill_equivalents"]
                and c["contains_vs_full"] is not None]
        ax.set_title(f"{ratio:g}x")
        if not here:  # full context answered nothing: no ratio to plot
            ax.text(0.5, 0.5, "no scores relative to full context", ha="center", transform=ax.transAxes)
            continue
        families: dict[str, list] = {}
        for c in here:
            families.setdefault(c["method"].split("+")[0], []).append(c)
        for family, points in families.items():
            points.sort(key=lambda c: c["prefill_equivalents"])
            ax.plot([c["prefill_equivalents"] for c in points], [c["contains_vs_full"] for c in points], "o-",
                    label=family)
            for c in points:
                ax.annotate(c["method"].removeprefix(family), (c["prefill_equivalents"], c["contains_vs_full"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        for condition, style, colour in (("truncate", "--", "tab:orange"), ("retrieve", "-.", "tab:purple"),
                                         ("none", ":", "tab:red")):
            # with several budgets at this ratio, the line is the first method's baseline
            ref = _baseline_for(summary["conditions"], condition, ratio, None)
            if ref and ref["contains_vs_full"] is not None:
                ax.axhline(ref["contains_vs_full"], linestyle=style, color=colour, label=condition)
        ax.axhline(1.0, color="tab:green", label="full context")
        for r, budget, goal in TARGETS:
            if r == ratio:
                ax.plot([budget], [goal], marker="*", color="black", markersize=9)
        ax.set_xscale("log")
        ax.set_xlabel("compile cost (prefill equivalents, log)")
        ax.set_ylabel('"contains" relative to full context')
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Quality per compile cost (stars: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
