"""Turn `lcc eval` document results into a summary, report.md, results.json and a plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..format.fsio import atomic_write
from .scoring import normalize, token_f1


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(results: list[dict], kv_bytes_per_position: int) -> dict:
    rows = [r for doc in results for r in doc["rows"]]
    conditions = []
    keys = sorted({(r["condition"], r["ratio"]) for r in rows}, key=lambda k: (_ORDER[k[0]], k[1] or 0))
    for condition, ratio in keys:
        sel = [r for r in rows if r["condition"] == condition and r["ratio"] == ratio]
        conditions.append({"condition": condition, "ratio": ratio, "n": len(sel),
                           **{m: _mean(r[m] for r in sel) for m in ("em", "f1", "contains")},
                           "ttft": _mean(r["ttft"] for r in sel), "seconds": _mean(r["seconds"] for r in sel),
                           "kv_positions": _mean(r["kv_positions"] for r in sel)})
    full = next((c for c in conditions if c["condition"] == "full"), None)
    for c in conditions:
        for m in ("em", "f1", "contains"):
            c[f"{m}_vs_full"] = c[m] / full[m] if full and full[m] else None
    return {"documents": sum(1 for d in results if not d["id"].startswith("article:")),
            "questions": len({(r["doc"], r["question"]) for r in rows}),
            "conditions": conditions, "costs": _costs(results, conditions, kv_bytes_per_position),
            "general": _general(results)}


_ORDER = {"full": 0, "none": 1, "truncate": 2, "cartridge": 3, "full_article": 4, "composed": 5}


def _costs(results, conditions, kv_bytes_per_position) -> list[dict]:
    full = next(c for c in conditions if c["condition"] == "full")
    out = []
    for ratio in sorted({float(r) for doc in results for r in doc["compiles"]}):
        key = str(ratio)
        docs = [d for d in results if key in d["compiles"]]
        cart = next(c for c in conditions if c["condition"] == "cartridge" and c["ratio"] == ratio)
        compile_s = _mean(d["compiles"][key]["seconds"] for d in docs)
        saving = full["seconds"] - cart["seconds"]
        out.append({
            "ratio": ratio, "slots": _mean(d["compiles"][key]["slots"] for d in docs),
            "compile_seconds": compile_s,
            "prefill_equivalents": _mean(d["compiles"][key]["prefill_equivalents"] for d in docs),
            "ttft_full": full["ttft"], "ttft_cartridge": cart["ttft"],
            "ttft_ratio": full["ttft"] / cart["ttft"] if cart["ttft"] else None,
            "ask_seconds_full": full["seconds"], "ask_seconds_cartridge": cart["seconds"],
            "kv_bytes_full": full["kv_positions"] * kv_bytes_per_position,
            "kv_bytes_cartridge": cart["kv_positions"] * kv_bytes_per_position,
            "kv_ratio": full["kv_positions"] / cart["kv_positions"],
            # Compiling pays off once the prefill it saves per question adds up to its cost.
            "break_even_questions": compile_s / saving if saving > 0 else None,
        })
    return out


def _general(results) -> list[dict]:
    out = []
    for ratio in sorted({float(r) for doc in results for r in doc.get("general", {})}):
        pairs = [p for d in results for p in d.get("general", {}).get(str(ratio), [])]
        if pairs:
            out.append({"ratio": ratio, "n": len(pairs),
                        "match_rate": _mean(float(normalize(p["none"]) == normalize(p["cartridge"])) for p in pairs),
                        "token_f1": _mean(token_f1(p["cartridge"], [p["none"]]) for p in pairs)})
    return out


def write_report(results: list[dict], out: Path, meta: dict) -> dict:
    summary = summarize(results, meta["kv_bytes_per_position"])
    payload = {"meta": meta, "summary": summary, "documents": results}
    atomic_write(out / "results.json", json.dumps(payload, indent=1).encode())
    plot = _plot(summary, out / "score_vs_ratio.png")
    atomic_write(out / "report.md", render_markdown(summary, meta, plot).encode())
    return summary


def _fmt(v, digits=3):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(summary: dict, meta: dict, plot: str | None) -> str:
    lines = [f"# lcc eval report", "",
             f"Model `{meta['model']}` (fingerprint `{meta['fingerprint'][:16]}`), data `{meta['data']}`, "
             f"{summary['documents']} documents, {summary['questions']} questions, machine: {meta['machine']}. "
             f"lcc {meta['lcc_version']}, {meta['finished']}.", "",
             f"Compile settings: `{json.dumps(meta['compile'], sort_keys=True)}`", "",
             "## Quality", "", score_table(summary), "",
             "`*_vs_full` is the condition's mean score divided by the full-context mean, same run.",
             "`truncate` gives the model the first K document tokens, K = the cartridge's slots.",
             "`composed` answers each article's questions from all its paragraphs' cartridges at once (one "
             "cartridge per paragraph, concatenated); its baseline is `full_article`, all paragraphs in the "
             "prompt. Composition costs what `composed` loses against `cartridge` on the same questions.", "",
             "## Cost", "", cost_table(summary), "",
             "Prefill equivalents: compile seconds / seconds of one forward pass over the document, timed "
             "in the same run. Break-even: compile seconds / ask seconds saved per question (none if the "
             "cartridge saves nothing).", ""]
    if summary["general"]:
        lines += ["## General ability", "",
                  "Held-out generic instructions asked with the cartridge and with no document; how often the "
                  "answers match after normalisation, and their token F1.", "",
                  "| ratio | probes | match rate | token F1 |", "|---|---|---|---|"]
        lines += [f"| {g['ratio']:g} | {g['n']} | {_fmt(g['match_rate'])} | {_fmt(g['token_f1'])} |"
                  for g in summary["general"]]
        lines.append("")
    if plot:
        lines += [f"![score vs ratio]({plot})", ""]
    return "\n".join(lines)


def score_table(summary: dict) -> str:
    head = "| condition | ratio | n | EM | F1 | contains | F1 vs full | contains vs full |\n|---|---|---|---|---|---|---|---|"
    body = [f"| {c['condition']} | {c['ratio'] if c['ratio'] is not None else '–'} | {c['n']} | {_fmt(c['em'])} | "
            f"{_fmt(c['f1'])} | {_fmt(c['contains'])} | {_fmt(c['f1_vs_full'], 2)} | {_fmt(c['contains_vs_full'], 2)} |"
            for c in summary["conditions"]]
    return "\n".join([head, *body])


def cost_table(summary: dict) -> str:
    head = ("| ratio | slots | compile s | prefill equiv. | TTFT full / cart (s) | TTFT ratio | "
            "KV bytes full / cart | KV ratio | break-even questions |\n|---|---|---|---|---|---|---|---|---|")
    body = [f"| {c['ratio']:g} | {_fmt(c['slots'], 1)} | {_fmt(c['compile_seconds'], 1)} | "
            f"{_fmt(c['prefill_equivalents'], 0)} | {_fmt(c['ttft_full'])} / {_fmt(c['ttft_cartridge'])} | "
            f"{_fmt(c['ttft_ratio'], 2)} | {c['kv_bytes_full']:,.0f} / {c['kv_bytes_cartridge']:,.0f} | "
            f"{_fmt(c['kv_ratio'], 1)} | {_fmt(c['break_even_questions'], 0)} |" for c in summary["costs"]]
    return "\n".join([head, *body])


def _plot(summary: dict, path: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    carts = [c for c in summary["conditions"] if c["condition"] == "cartridge"]
    if not carts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = [c["ratio"] for c in carts]
    ax.plot(ratios, [c["f1"] for c in carts], "o-", label="cartridge")
    trunc = [c for c in summary["conditions"] if c["condition"] == "truncate"]
    ax.plot([c["ratio"] for c in trunc], [c["f1"] for c in trunc], "s--", label="truncate (same KV)")
    for c, style in (("full", "g-"), ("none", "r:")):
        ref = next((x for x in summary["conditions"] if x["condition"] == c), None)
        if ref:
            ax.axhline(ref["f1"], color=style[0], linestyle=style[1:], label=c)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
    ax.set_xlabel("compression ratio")
    ax.set_ylabel("token F1")
    ax.legend()
    ax.set_title("QA token F1 vs compression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
