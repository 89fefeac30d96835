"""`lcc eval`: answer a dataset's questions under several conditions and measure quality and cost.

Conditions, all with the same prompt layout, decoding settings and scorer:
  full       the document in the prompt
  none       no document
  truncate   the first K document tokens in the prompt, K = the cartridge's slots (same KV budget)
  cartridge  the compiled cartridge, at each requested ratio

Each finished document is written to DIR/docs/ at once, and compiled cartridges are cached in
DIR/cartridges/ by document hash + settings, so an interrupted run resumes where it stopped.
`report.write_report` turns the rows into report.md, results.json and a plot.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .cartridge import atomic_write, from_segments, load_cartridge, save_cartridge
from .config import AskConfig, CompileConfig
from .errors import InputError
from .ingest import Document
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


@dataclass
class EvalSettings:
    ratios: list[float] = field(default_factory=lambda: [4.0, 8.0, 16.0])
    limit: int | None = None  # documents
    questions_per_doc: int | None = None
    compile: CompileConfig = field(default_factory=CompileConfig)
    ask: AskConfig = field(default_factory=lambda: AskConfig(max_new_tokens=32))
    general_probes: bool = True
    # Also answer each article's questions from its paragraphs' cartridges composed together
    # (and, as the baseline, from all its paragraphs in the prompt).
    compose: bool = False
    documents: list[str] | None = None  # dataset ids to keep (before `limit`)


def load_dataset(path: Path) -> list[dict]:
    """Rows of {"id","title","context","questions":[{"q","answers","qid"}]} from JSONL."""
    if not path.is_file():
        raise InputError(f"no such dataset: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = (isinstance(row["context"], str) and row["context"].strip() and isinstance(row["questions"], list)
                  and all(isinstance(q["q"], str) and isinstance(q["answers"], list) for q in row["questions"]))
        except (ValueError, KeyError, TypeError) as exc:
            ok = False
        if not ok:
            raise InputError(f"{path.name} line {number}: not a dataset row (need context and questions)")
        row.setdefault("id", f"doc{number}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path.name} holds no documents")
    return rows


def _key(**blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def settings_key(loaded, settings: EvalSettings) -> str:
    """Identifies a finished document's results: everything that changes them."""
    return _key(fp=loaded.fingerprint, compile=settings.compile.to_dict(), ask=vars(settings.ask),
                ratios=settings.ratios, probes=settings.general_probes, qpd=settings.questions_per_doc)


def compile_key(loaded, cfg: CompileConfig) -> str:
    """Identifies a compiled cartridge: model and compile settings only."""
    return _key(fp=loaded.fingerprint, compile=cfg.to_dict())


def evaluate(loaded, rows: list[dict], settings: EvalSettings, out: Path, on_doc=None, on_step=None) -> list[dict]:
    """Evaluate every document (reusing finished ones) and return their result dicts."""
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "cartridges").mkdir(exist_ok=True)
    results = []
    for index, row in enumerate(rows):
        doc_sha = hashlib.sha256(row["context"].encode()).hexdigest()
        done_path = out / "docs" / f"{_slug(row['id'])}-{doc_sha[:12]}-{settings_key(loaded, settings)}.json"
        if on_doc:
            on_doc(index, len(rows), row, done_path.exists())
        if done_path.exists():
            results.append(json.loads(done_path.read_text()))
            continue
        result = evaluate_document(loaded, row, doc_sha, settings, out / "cartridges", on_step)
        atomic_write(done_path, json.dumps(result).encode())
        results.append(result)
    if settings.compose:
        results += evaluate_compositions(loaded, rows, settings, out)
    return results


def evaluate_compositions(loaded, rows: list[dict], settings: EvalSettings, out: Path) -> list[dict]:
    """For each article with several paragraphs: answer all its questions from the
    paragraphs' cartridges composed (`composed`), and from all paragraphs in the prompt
    (`full_article`). Compare with `cartridge` and `full` on single paragraphs."""
    from .cartridge import combine

    from .reader import answer_from_kv, answer_from_text

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("title") or row["id"], []).append(row)
    results = []
    for title, members in groups.items():
        if len(members) < 2:
            continue
        key = _key(docs=[hashlib.sha256(m["context"].encode()).hexdigest() for m in members],
                   s=settings_key(loaded, settings))
        done_path = out / "docs" / f"article-{_slug(title)}-{key}.json"
        if done_path.exists():
            results.append(json.loads(done_path.read_text()))
            continue
        joined = "\n\n".join(m["context"] for m in members)
        result = {"id": f"article:{title}", "title": title, "rows": [], "compiles": {}, "general": {}}
        composed = {}
        for ratio in settings.ratios:
            carts = [compiled_cartridge(loaded, m, hashlib.sha256(m["context"].encode()).hexdigest(), ratio,
                                        settings, out / "cartridges")[0] for m in members]
            kv, first = combine(carts)
            composed[ratio] = ([(k.to(loaded.model.device), v.to(loaded.model.device)) for k, v in kv], first)
        for m in members:
            for q in _questions(m, settings):
                rows = result["rows"]
                rows.append(_row(m, q, "full_article", None, answer_from_text(loaded, q["q"], joined, settings.ask)))
                for ratio, (kv, first) in composed.items():
                    rows.append(_row(m, q, "composed", ratio, answer_from_kv(loaded, kv, first, q["q"], settings.ask)))
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
    import re

    return re.sub(r"[^A-Za-z0-9_.#-]+", "_", str(text))[:80]


def _questions(row: dict, settings: EvalSettings) -> list[dict]:
    qs = row["questions"]
    return qs[: settings.questions_per_doc] if settings.questions_per_doc else qs


def evaluate_document(loaded, row: dict, doc_sha: str, settings: EvalSettings, cart_dir: Path, on_step=None) -> dict:
    from .prompts import Prompter
    from .reader import answer_from_kv, answer_from_text

    text = row["context"]
    questions = _questions(row, settings)
    prompter = Prompter(loaded.tokenizer)
    doc_tokens = prompter.encode(text)
    prefill_s = time_prefill(loaded, prompter.context_ids(text))
    rows, compiles, general = [], {}, {}

    def ask_all(condition, ratio, fn):
        for q in questions:
            a = fn(q["q"])
            rows.append(_row(row, q, condition, ratio, a))

    ask = settings.ask
    ask_all("full", None, lambda q: answer_from_text(loaded, q, text, ask))
    ask_all("none", None, lambda q: answer_from_text(loaded, q, None, ask))
    none_general = [answer_from_text(loaded, g, None, ask).text for g in GENERAL_PROBES] if settings.general_probes else []
    for ratio in settings.ratios:
        cart, seconds = compiled_cartridge(loaded, row, doc_sha, ratio, settings, cart_dir, on_step)
        k = cart.slots
        truncated = loaded.tokenizer.decode(doc_tokens[:k], skip_special_tokens=True)
        ask_all("truncate", ratio, lambda q: answer_from_text(loaded, q, truncated, ask))
        kv, first = cart.reader_kv(loaded.model.device), cart.first_query_position
        ask_all("cartridge", ratio, lambda q: answer_from_kv(loaded, kv, first, q, ask))
        compiles[str(ratio)] = {"slots": k, "seconds": seconds, "prefill_equivalents": seconds / prefill_s,
                                "metrics": cart.manifest["metrics"]["segments"]}
        if settings.general_probes:
            cart_general = [answer_from_kv(loaded, kv, first, g, ask).text for g in GENERAL_PROBES]
            general[str(ratio)] = [{"probe": g, "none": a, "cartridge": b} for g, a, b in
                                   zip(GENERAL_PROBES, none_general, cart_general)]
    return {"id": row["id"], "title": row.get("title"), "doc_tokens": len(doc_tokens),
            "context_tokens": len(prompter.context_ids(text)), "prefill_seconds": prefill_s,
            "compiles": compiles, "rows": rows, "general": general}


def compiled_cartridge(loaded, row, doc_sha, ratio, settings: EvalSettings, cart_dir: Path, on_step=None):
    """Compile (or reuse a cached) cartridge; returns it and its compile seconds."""
    from dataclasses import replace

    from .build import compile_document

    cfg = replace(settings.compile, ratio=ratio)
    path = cart_dir / f"{doc_sha[:12]}-r{ratio:g}-{compile_key(loaded, cfg)}.lcc"
    if path.exists():
        cart = load_cartridge(path)
        return cart, cart.manifest["metrics"]["seconds"]
    doc = Document(text=row["context"], sha256=doc_sha, name=f"{row['id']}.txt")
    started = time.perf_counter()
    segments = compile_document(loaded, doc, cfg, on_step=on_step)
    seconds = time.perf_counter() - started
    cart = from_segments(loaded, segments, doc, cfg.to_dict(), __version__)
    cart.manifest["metrics"]["seconds"] = round(seconds, 3)
    save_cartridge(cart, path, force=True)
    return cart, seconds


def time_prefill(loaded, ids: list[int], repeats: int = 3) -> float:
    """Median seconds of one forward pass over the document's context turn: the unit of
    'prefill equivalents', timed in the same run as the compiles it divides."""
    import torch

    from .kvcache import prefill

    times = []
    with torch.inference_mode():
        prefill(loaded.model, ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            prefill(loaded.model, ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
