"""`lcc eval`: answer a dataset's questions under several conditions and measure quality and cost.

Conditions, all with the same prompt layout, decoding settings and scorer:
  full       the document in the prompt
  none       no document
  truncate   the first K document tokens in the prompt, K = the cartridge's slots (same KV budget)
  cartridge  the compiled cartridge, at each requested ratio

Cartridges come from the one compile path (compile/document.py), in this process. Each
finished document is written to DIR/docs/ at once, and compiled cartridges are cached in
DIR/cartridges/ by document hash + settings, so an interrupted run resumes where it stopped.
`report.write_report` turns the rows into report.md, results.json and a plot.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from pathlib import Path

from ..compile.base import CompilerSpec
from ..config import CompileConfig, EvalSettings
from ..format.cartridge import Cartridge, load_cartridge
from ..format.fsio import atomic_write
from ..ingest import Document
from ..progress import NO_PROGRESS, Progress
from ..runtime.reader import answer
from .scoring import score

# Held out from the compile-time instruction pool: checks that reading a cartridge does not
# wreck the model's general behaviour (answers should match the no-document answers).
GENERAL_PROBES = [
    "What is 3 plus 5?",
    "Name a primary colour.",
    "What is the capital of Italy?",
    "Write the word 'yes' in capital letters.",
    "How many days are in a week?",
    "What animal says 'meow'?",
    "Give the opposite of 'up'.",
    "What is the first letter of the alphabet?",
]


def _key(**blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def settings_key(loaded, settings: EvalSettings, spec: CompilerSpec) -> str:
    """Identifies a finished document's results: everything that changes them."""
    return _key(fp=loaded.fingerprint, compile=settings.compile.to_dict(), ask=vars(settings.ask),
                ratios=settings.ratios, probes=settings.general_probes, qpd=settings.questions_per_doc,
                compiler=[spec.name, spec.path])


def evaluate(loaded, rows: list[dict], settings: EvalSettings, out: Path, spec: CompilerSpec = CompilerSpec(),
             progress: Progress = NO_PROGRESS) -> list[dict]:
    """Evaluate every document (reusing finished ones) and return their result dicts."""
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "cartridges").mkdir(exist_ok=True)
    results = []
    progress.start("documents", len(rows))
    for row in rows:
        doc_sha = hashlib.sha256(row["context"].encode()).hexdigest()
        done_path = out / "docs" / f"{_slug(row['id'])}-{doc_sha[:12]}-{settings_key(loaded, settings, spec)}.json"
        if done_path.exists():
            results.append(json.loads(done_path.read_text()))
        else:
            result = evaluate_document(loaded, row, doc_sha, settings, out / "cartridges", spec, progress)
            atomic_write(done_path, json.dumps(result).encode())
            results.append(result)
        progress.advance("documents")
    if settings.compose:
        results += evaluate_compositions(loaded, rows, settings, out, spec)
    return results


def evaluate_compositions(loaded, rows: list[dict], settings: EvalSettings, out: Path,
                          spec: CompilerSpec) -> list[dict]:
    """For each article with several paragraphs: answer all its questions from the
    paragraphs' cartridges composed (`composed`), and from all paragraphs in the prompt
    (`full_article`). Compare with `cartridge` and `full` on single paragraphs."""
    from ..compose import combine

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("title") or row["id"], []).append(row)
    results = []
    for title, members in groups.items():
        if len(members) < 2:
            continue
        key = _key(docs=[hashlib.sha256(m["context"].encode()).hexdigest() for m in members],
                   s=settings_key(loaded, settings, spec))
        done_path = out / "docs" / f"article-{_slug(title)}-{key}.json"
        if done_path.exists():
            results.append(json.loads(done_path.read_text()))
            continue
        joined = "\n\n".join(m["context"] for m in members)
        result = {"id": f"article:{title}", "title": title, "rows": [], "compiles": {}, "general": {}}
        composed = {}
        for ratio in settings.ratios:
            carts = [compiled_cartridge(loaded, m, hashlib.sha256(m["context"].encode()).hexdigest(), ratio,
                                        settings, out / "cartridges", spec)[0] for m in members]
            composed[ratio] = combine(carts)
        for m in members:
            qs = _questions(m, settings)
            texts = [q["q"] for q in qs]
            full = answer(loaded, texts, document=joined, cfg=settings.ask, batch=True)
            result["rows"] += [_row(m, q, "full_article", None, a) for q, a in zip(qs, full)]
            for ratio, buffer in composed.items():
                got = answer(loaded, texts, buffer=buffer, cfg=settings.ask, batch=True)
                result["rows"] += [_row(m, q, "composed", ratio, a) for q, a in zip(qs, got)]
        atomic_write(done_path, json.dumps(result).encode())
        results.append(result)
    return results


def _row(doc: dict, q: dict, condition: str, ratio: float | None, a) -> dict:
    """One scored answer. kv_positions: every cache position the answer's prompt attended to."""
    return {"doc": doc["id"], "qid": q.get("qid"), "question": q["q"], "answers": q["answers"],
            "condition": condition, "ratio": ratio, "prediction": a.text, **score(a.text, q["answers"]),
            "ttft": a.seconds_to_first_token, "seconds": a.seconds_total,
            "kv_positions": a.kv_positions + a.prompt_tokens}


def _slug(text: str) -> str:
    """A file-name-safe form of a dataset id or title ("AC/DC" must not become a directory)."""
    return re.sub(r"[^A-Za-z0-9_.#-]+", "_", str(text))[:80]


def _questions(row: dict, settings: EvalSettings) -> list[dict]:
    qs = row["questions"]
    return qs[: settings.questions_per_doc] if settings.questions_per_doc else qs


def evaluate_document(loaded, row: dict, doc_sha: str, settings: EvalSettings, cart_dir: Path,
                      spec: CompilerSpec = CompilerSpec(), progress: Progress = NO_PROGRESS) -> dict:
    text = row["context"]
    qs = _questions(row, settings)
    texts = [q["q"] for q in qs]
    prompter = loaded.prompter
    doc_tokens = prompter.encode(text)
    prefill_s = time_prefill(loaded, prompter.context_ids(text))
    rows, compiles, general = [], {}, {}
    ask = settings.ask

    def add(condition, ratio, answers):
        rows.extend(_row(row, q, condition, ratio, a) for q, a in zip(qs, answers))

    add("full", None, answer(loaded, texts, document=text, cfg=ask, batch=True))
    add("none", None, answer(loaded, texts, document=None, cfg=ask, batch=True))
    none_general = ([a.text for a in answer(loaded, GENERAL_PROBES, cfg=ask, batch=True)]
                    if settings.general_probes else [])
    for ratio in settings.ratios:
        cart, seconds = compiled_cartridge(loaded, row, doc_sha, ratio, settings, cart_dir, spec, progress)
        k = cart.slots
        truncated = loaded.tokenizer.decode(doc_tokens[:k], skip_special_tokens=True)
        add("truncate", ratio, answer(loaded, texts, document=truncated, cfg=ask, batch=True))
        add("cartridge", ratio, answer(loaded, texts, buffer=cart.buffer, cfg=ask, batch=True))
        compiles[str(ratio)] = {"slots": k, "seconds": seconds, "prefill_equivalents": seconds / prefill_s,
                                "metrics": cart.manifest["metrics"]["segments"]}
        if settings.general_probes:
            cart_general = [a.text for a in answer(loaded, GENERAL_PROBES, buffer=cart.buffer, cfg=ask, batch=True)]
            general[str(ratio)] = [{"probe": g, "none": a, "cartridge": b} for g, a, b in
                                   zip(GENERAL_PROBES, none_general, cart_general)]
    return {"id": row["id"], "title": row.get("title"), "doc_tokens": len(doc_tokens),
            "context_tokens": len(prompter.context_ids(text)), "prefill_seconds": prefill_s,
            "compiles": compiles, "rows": rows, "general": general}


def compile_key(loaded, cfg: CompileConfig, spec: CompilerSpec) -> str:
    """Identifies a compiled cartridge: model, compile settings and compiler only."""
    return _key(fp=loaded.fingerprint, compile=cfg.to_dict(), compiler=[spec.name, spec.path])


def compiled_cartridge(loaded, row, doc_sha, ratio, settings: EvalSettings, cart_dir: Path,
                       spec: CompilerSpec = CompilerSpec(), progress: Progress = NO_PROGRESS) -> tuple[Cartridge, float]:
    """Compile (or reuse a cached) cartridge through the one compile path; returns it and
    its compile seconds."""
    from ..backends.local import LocalExecutor
    from ..compile.document import DocumentTask, compile_all, text_segments

    cfg = settings.compile_at(ratio)
    path = cart_dir / f"{doc_sha[:12]}-r{ratio:g}-{compile_key(loaded, cfg, spec)}.lcc"
    if path.exists():
        cart = load_cartridge(path)
        return cart, cart.manifest["metrics"]["seconds"]
    doc = Document(text=row["context"], sha256=doc_sha, name=f"{row['id']}.txt")
    started = time.perf_counter()
    task = DocumentTask(doc, path, text_segments(loaded, doc.text, cfg), overwrite=True)
    compile_all(loaded, [task], cfg, spec, LocalExecutor(loaded), progress)
    return task.cartridge, time.perf_counter() - started


def time_prefill(loaded, ids: list[int], repeats: int = 5) -> float:
    """Median seconds of one forward pass over the document's context turn: the unit of
    'prefill equivalents', timed in the same run as the compiles it divides (a median of
    several, because one timing on a busy machine can be off by 10x)."""
    import torch

    from ..runtime.cache import prefill

    times = []
    with torch.inference_mode():
        prefill(loaded.model, ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            prefill(loaded.model, ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
