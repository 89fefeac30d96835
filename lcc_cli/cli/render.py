"""Everything the CLI shows passes through here. Strings that come from files (model ids,
source names, manifest fields, answers) are data, never markup or terminal commands: control
characters are escaped visibly, rich markup is escaped, and JSON is printed with every
non-ASCII character escaped, so it stays exact and cannot drive the terminal.
"""

from __future__ import annotations

import json
import sys

from rich.markup import escape


def clean(value) -> str:
    """A string safe to print: control characters (ESC, OSC, BEL, C1...) and lone
    surrogates shown as escapes; ordinary text, including non-Latin scripts, unchanged."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in "\n\t" else ascii(ch)[1:-1] for ch in text)


def markup_safe(value) -> str:
    """`clean` plus rich markup escaped, for strings placed inside rich tables or markup."""
    return escape(clean(value))


def print_json(payload) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=True, default=str) + "\n")
    sys.stdout.flush()


def print_json_line(payload) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=True, default=str) + "\n")
    sys.stdout.flush()


def inspect_rows(info: dict):
    """(label, value) rows for `lcc inspect`, every value cleaned."""
    m = info["manifest"]
    model, buf, src, c = m["model"], m["buffer"], m["source"], m["compile"]
    rope = model.get("rope") or {}
    converted = " (converted from v1 on load)" if m.get("converted_from") == 1 else ""
    yield "format", f"{m['format']} v{m['format_version']}{converted} (lcc {m['lcc_version']}, {m['created']})"
    yield "model", f"{model['id']}  sha256:{model['fingerprint'][:16]}…"
    yield "model shape", (f"{model['num_layers']} layers, {model['num_kv_heads']} kv heads, head dim "
                          f"{model['head_dim']}, rope {rope.get('rope_type')} theta {rope.get('rope_theta')}")
    index = m.get("index")
    if index:
        gist = sum(s["slots"] for s in buf["segments"])
        yield "buffer", (f"indexed: {index['doc_tokens']:,} document tokens in {len(index['pages']):,} "
                         f"{index.get('page_kind', '')} pages ({len(index['windows'])} window(s)), "
                         f"{gist} gist entries, {buf.get('dtype')}; each question reads its own pages")
    else:
        yield "buffer", (f"{buf['total_slots']} slots in {len(buf['segments'])} segment(s), {buf.get('dtype')}; "
                         f"question starts at position {buf['first_query_position']}")
    for s in buf["segments"][:8]:
        sink = ", first is an attention sink" if s.get("sink") else ""
        yield f"  segment {s['index']}", (f"{s['token_count']} tokens -> {s['slots']} slots at positions "
                                          f"{s['position_start']}..{s['position_start'] + s['slots'] - 1}{sink}")
    if len(buf["segments"]) > 8:
        yield "  …", f"{len(buf['segments']) - 8} more segments"
    yield "source", f"{src.get('name')}  sha256:{str(src.get('sha256'))[:16]}…  {src.get('token_count')} tokens"
    yield "ratio", src.get("ratio")
    compiler = m.get("compiler") or {}
    yield "compiler", ", ".join(f"{k}={v}" for k, v in compiler.items())
    # pages alone: no compiler ran, so its settings (LoRA, KL, cloze, steps) describe nothing
    shown = [k for k in c if k in _PAGE_SETTINGS] if index and not buf["segments"] else [
        k for k in c if k != "lora_targets"]
    yield "compile", ", ".join(f"{k}={c[k]}" for k in shown)
    if "prompt" in m:
        yield "prompt", f"system turn: {str(m['prompt'].get('system'))[:80]!r}"
    if "reading_prefix" in info:
        yield "reading prefix", info["reading_prefix"] or "none for this model (answers read without one)"
    check = m["metrics"].get("self_check")
    checked = check.get("seconds") if isinstance(check, dict) else None
    yield "compile time", f"{m['metrics'].get('seconds')} s" + (f"; self-check {checked} s more" if checked else "")
    if isinstance(check, dict) and check.get("skipped"):
        yield "self-check", f"skipped: {check['skipped']}"
    elif isinstance(check, dict):
        yield "self-check", (f"answers agree {check.get('agreement')} (token F1 between document and cartridge "
                             f"answers to {check.get('questions')} questions the model asked itself)")
    yield "file size", f"{info['bytes']:,} bytes"
    if info.get("bytes_per_token"):
        yield "bytes per document token", f"{info['bytes_per_token']:,.0f}"


_PAGE_SETTINGS = ("ratio", "index", "gist", "pages", "page_tokens", "kv_dtype", "key_summaries", "window_tokens",
                  "window_mode", "window_overlap", "seed")


def prefix_rows(info: dict):
    """(label, value) rows for `lcc inspect` of a reading-prefix file."""
    m = info["manifest"]
    t = m.get("training") if isinstance(m.get("training"), dict) else {}
    v = t.get("validation") if isinstance(t.get("validation"), dict) else {}
    yield "format", f"{m['format']} v{m['format_version']} (lcc {m.get('lcc_version')}, {m.get('created')})"
    yield "model", f"{m['model'].get('id')}  sha256:{str(m['model'].get('fingerprint'))[:16]}…"
    yield "prefix", f"{m['name']}: {m['entries']} entries a layer, read before every context turn"
    yield "training", (f"{t.get('steps')} steps, kept step {t.get('selected_step')}; held-out F1 {v.get('val_f1')}, "
                       f"contains {v.get('val_contains')}, general answers' F1 against the plain model "
                       f"{v.get('general_f1')}")
    yield "file size", f"{info['bytes']:,} bytes"


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def compiler_rows(info: dict):
    """(label, value) rows for `lcc inspect` of a compiler file. The training table only
    describes the run (load checks the fields that build the compiler), so a field that is
    missing or of another type shows as '?' instead of failing the listing."""
    m = info["manifest"]
    model, c = m["model"], m["compiler"]
    t = m.get("training") if isinstance(m.get("training"), dict) else {}
    yield "format", f"{m['format']} v{m['format_version']} (lcc {m.get('lcc_version')}, {m.get('created')})"
    yield "model", f"{model.get('id')}  sha256:{str(model.get('fingerprint'))[:16]}…"
    yield "compiler", (f"LoRA rank {c.get('lora_rank')} alpha {c.get('lora_alpha')} on "
                       f"{', '.join(map(str, c.get('lora_targets', [])))}; slots {c.get('slot_init')}; "
                       f"sink {c.get('sink')}")
    yield "ratios", f"{t.get('ratios')}"
    yield "training", (f"{t.get('steps')} steps (kept step {t.get('selected_step')}, held-out QA KL "
                       f"{t.get('heldout_qa_kl')}), {_count(t.get('tokens'))} tokens in {t.get('seconds')} s on "
                       f"{t.get('device')} ({t.get('tokens_per_second')} tokens/s)")
    objective = t.get("objective")
    yield "objective", ", ".join(f"{k} {v}" for k, v in objective.items()) if isinstance(objective, dict) else "?"
    for d in t.get("data") if isinstance(t.get("data"), list) else []:
        if isinstance(d, dict):
            yield "data", f"{d.get('name')}  sha256:{str(d.get('sha256'))[:16]}…  {d.get('rows')} rows"
    yield "file", f"{info['bytes']:,} bytes, sha256:{info['sha256'][:16]}…"
