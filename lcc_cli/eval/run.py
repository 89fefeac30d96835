"""`lcc eval`: answer a dataset's questions under several conditions and measure quality and cost.

Conditions, all with the same prompt layout, decoding settings and scorer:
  full       the document in the prompt
  none       no document
  truncate   the first K document tokens in the prompt, K = the cartridge's slots (same KV budget)
  retrieve   the question's best BM25 sentences of the document, K tokens at most (retrieval.py)
  cartridge_routed  (with `route`) a multi-segment cartridge read through only the segments each
             question's attention favours (runtime/memory/)
  cartridge  a compiled cartridge, for each method (compiler + settings) at each ratio

A method may run on every `stride`-th document only (an expensive one, e.g. from scratch);
its scores are then compared with full context on the same documents. With `compose`, each
article's questions are also answered from all its paragraphs' cartridges composed, in both
layouts (`composed`: side by side; `composed_overlap`), against all paragraphs in the prompt
(`full_article`). With `layout_check`, the first method's cartridges are also read in the v1
layout (buffer after its text; the maths says: identical answers) and stored as bfloat16.

Cartridges come from `compile_fn` (api.py hands in the one compile path), cached in
DIR/cartridges/; each finished document is written to DIR/docs/ at once, so an interrupted
run resumes where it stopped. `report.write_report` turns the rows into the report.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compile.base import CompilerSpec
from ..config import CompileConfig, EvalSettings, ReadConfig
from ..format.cartridge import Cartridge, load_cartridge
from ..format.compiler_file import read_compiler_manifest
from ..format.fsio import atomic_write
from ..ingest import Document
from ..progress import NO_PROGRESS, Progress
from ..runtime.memory import Whole, open_memory
from ..runtime.prefix import reading_prefix
from ..scoring import score

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


@dataclass(frozen=True)
class Method:
    """One way of compiling: a label, the compiler, its settings at a given ratio, and which
    documents it runs on (every `stride`-th)."""

    label: str
    spec: CompilerSpec
    settings: dict  # CompileConfig fields (ratio excluded)
    stride: int = 1
    read: dict = field(default_factory=dict)  # ReadConfig fields: how an indexed cartridge is read

    def config(self, ratio: float) -> CompileConfig:
        return CompileConfig.from_dict({**self.settings, "ratio": ratio})


def _key(**blob) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _method_key(m: Method) -> list:
    # Not the stride: it decides which documents a method runs on, not what it produces, so
    # a bench resized later reuses the cartridges and documents already done. The compiler's
    # weights (the digest its header records), not its path: retraining the shipped compiler
    # rewrites the same path.
    # Settings added after results were cached are left out at their defaults, where they
    # change nothing, so that adding one does not throw away hours of cached compiles.
    weights = read_compiler_manifest(Path(m.spec.path))["tensor_sha256"] if m.spec.path else None
    defaults = CompileConfig()
    settings = {k: v for k, v in m.settings.items() if not (k in _LATER_FIELDS and v == getattr(defaults, k))}
    if not settings.get("index"):  # a compiled buffer: what only indexed cartridges read changes nothing
        settings = {k: v for k, v in settings.items() if k not in _INDEX_FIELDS}
    read = dict(m.read)
    if settings.get("index"):
        # read settings whose default changed after results were cached, at their new default:
        # results cached before the change read otherwise, so they must not match
        read |= {k: v for k, v in vars(ReadConfig.from_dict(m.read)).items() if k in _READ_CHANGED and v != 0}
    return [m.label, m.spec.name, weights, settings] + ([read] if read else [])


_READ_CHANGED = ("reencode", "floor")  # each was 0 (never) before it was a setting


_INDEX_FIELDS = ("index", "gist", "pages", "page_tokens", "window_tokens", "window_mode", "window_overlap",
                 "key_summaries")
# only direct KV refinement, biases and indexed cartridges read them
_LATER_FIELDS = ("kv_lr", "bias", "self_check", "index", "gist", "pages", "page_tokens", "kv_dtype", "window_tokens",
                 "window_mode", "window_overlap", "key_summaries")


def settings_key(loaded, settings: EvalSettings, methods: list[Method]) -> str:
    """Identifies a finished document's results: everything that changes them."""
    # `baselines` enters the key only when off, so that documents cached before it existed stay valid
    later = {} if settings.baselines else {"baselines": False}
    if settings.prefix_baselines:
        later["prefix_baselines"] = True
    if settings.baseline_formats != ["plain"]:
        later["formats"] = settings.baseline_formats
    if settings.retrieve_dense:
        later["dense"] = True
    if ReadConfig().floor:  # the retrieve baseline reads with the floor an indexed read has
        later["floor"] = ReadConfig().floor
    prefix = reading_prefix(loaded)
    if prefix is not None:  # results read with another prefix (or none) do not stand for these
        later["prefix"] = prefix.name
    return _key(fp=loaded.fingerprint, ask=vars(settings.ask), ratios=settings.ratios, probes=settings.general_probes,
                qpd=settings.questions_per_doc, methods=[_method_key(m) for m in methods],
                check=settings.layout_check, sample=settings.sample_seed, retrieve=settings.retrieve,
                route=settings.route, **later)


def evaluate(loaded, rows: list[dict], settings: EvalSettings, out: Path, methods: list[Method], compile_fn,
             progress: Progress = NO_PROGRESS) -> list[dict]:
    """`compile_fn(document, method, ratio, progress) -> Cartridge` compiles in memory."""
    """Evaluate every document (reusing finished ones) and return their result dicts."""
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "cartridges").mkdir(exist_ok=True)
    results = []
    progress.start("documents", len(rows))
    for index, row in enumerate(rows):
        doc_sha = hashlib.sha256(row["context"].encode()).hexdigest()
        mine = [m for m in methods if index % m.stride == 0]
        done_path = out / "docs" / f"{_slug(row['id'])}-{doc_sha[:12]}-{settings_key(loaded, settings, mine)}.json"
        result = _read_done(done_path)
        if result is not None:
            results.append(result)
        else:
            result = evaluate_document(loaded, row, doc_sha, settings, out / "cartridges", mine, compile_fn, progress)
            atomic_write(done_path, json.dumps(result).encode())
            results.append(result)
        progress.advance("documents")
    if settings.compose:
        results += evaluate_compositions(loaded, rows, settings, out, methods[0], compile_fn)
    return results


def evaluate_compositions(loaded, rows: list[dict], settings: EvalSettings, out: Path, method: Method,
                          compile_fn) -> list[dict]:
    """For each article with several paragraphs: answer all its questions from the
    paragraphs' cartridges composed (both layouts), and from all paragraphs in the prompt."""
    from ..runtime.memory import compose

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("title") or row["id"], []).append(row)
    results = []
    for title, members in groups.items():
        if len(members) < 2:
            continue
        key = _key(docs=[hashlib.sha256(m["context"].encode()).hexdigest() for m in members],
                   s=settings_key(loaded, settings, [method]))
        done_path = out / "docs" / f"article-{_slug(title)}-{key}.json"
        done = _read_done(done_path)
        if done is not None:
            results.append(done)
            continue
        joined = "\n\n".join(m["context"] for m in members)
        result = {"id": f"article:{title}", "title": title, "rows": [], "compiles": [], "general": []}
        composed = {}
        for ratio in settings.ratios:
            carts = [compiled_cartridge(loaded, m, hashlib.sha256(m["context"].encode()).hexdigest(), ratio, method,
                                        out / "cartridges", compile_fn)[0] for m in members]
            composed[ratio] = {"composed": Whole(compose(carts, "consecutive"), loaded),
                               "composed_overlap": Whole(compose(carts, "overlap"), loaded)}
        read = ReadConfig.from_dict(method.read)
        prefix = reading_prefix(loaded, read.prefix, read.prefix_file)
        for m in members:
            qs = _questions(m, settings)
            texts = [q["q"] for q in qs]
            full = answers(loaded, text_view(loaded, joined), texts, settings.ask)
            result["rows"] += [_row(m, q, "full_article", None, None, a) for q, a in zip(qs, full)]
            for ratio, memories in composed.items():
                for condition, memory in memories.items():
                    got = answers(loaded, memory, texts, settings.ask, prefix)
                    result["rows"] += [_row(m, q, condition, ratio, method.label, a) for q, a in zip(qs, got)]
        atomic_write(done_path, json.dumps(result).encode())
        results.append(result)
    return results


def _read_done(path: Path) -> dict | None:
    """A finished document's results, or None (missing or damaged: evaluate it again)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("rows"), list) else None


def _row(doc: dict, q: dict, condition: str, ratio: float | None, method: str | None, a,
         budget: int | None = None) -> dict:
    """One scored answer. kv_positions: every cache position the answer's prompt attended to;
    budget: the KV entries a cartridge holds, and the tokens a baseline got to match one."""
    return {"doc": doc["id"], "qid": q.get("qid"), "question": q["q"], "answers": q["answers"],
            "condition": condition, "ratio": ratio, "method": method, "prediction": a.text,
            **score(a.text, q["answers"]), "ttft": a.seconds_to_first_token, "seconds": a.seconds_total,
            "kv_positions": a.kv_positions + a.prompt_tokens, "budget": budget}


def _slug(text: str) -> str:
    """A file-name-safe form of a dataset id or title ("AC/DC" must not become a directory)."""
    return re.sub(r"[^A-Za-z0-9_.#-]+", "_", str(text))[:80]


def _questions(row: dict, settings: EvalSettings) -> list[dict]:
    qs = row["questions"]
    if not settings.questions_per_doc or len(qs) <= settings.questions_per_doc:
        return qs
    if settings.sample_seed is None:
        return qs[: settings.questions_per_doc]
    import random

    picked = random.Random(f"{settings.sample_seed}:{row['id']}").sample(range(len(qs)), settings.questions_per_doc)
    return [qs[i] for i in sorted(picked)]


def evaluate_document(loaded, row: dict, doc_sha: str, settings: EvalSettings, cart_dir: Path,
                      methods: list[Method], compile_fn, progress: Progress = NO_PROGRESS) -> dict:
    text = row["context"]
    qs = _questions(row, settings)
    texts = [q["q"] for q in qs]
    prompter = loaded.prompter
    doc_tokens = prompter.encode(text)
    rows, compiles, general = [], [], []
    ask = settings.ask
    plain_prefix = reading_prefix(loaded) if settings.prefix_baselines else None

    def add(condition, ratio, method, answers, budget=None):
        rows.extend(_row(row, q, condition, ratio, method, a, budget) for q, a in zip(qs, answers))

    if settings.baselines and settings.full:
        add("full", None, None, answers(loaded, text_view(loaded, text), texts, ask))
        for fmt in settings.baseline_formats:
            if fmt != "plain":
                add(f"full_{fmt}", None, None, answers(loaded, text_view(loaded, text), texts, ask, answer_format=fmt))
        if settings.prefix_baselines and plain_prefix is not None:
            add("full_prefix", None, None, answers(loaded, text_view(loaded, text), texts, ask, plain_prefix))
    if settings.baselines:
        add("none", None, None, answers(loaded, text_view(loaded, None), texts, ask))
    none_general = ([a.text for a in answers(loaded, text_view(loaded, None), GENERAL_PROBES, ask)]
                    if settings.general_probes else [])
    truncated_at: set[tuple[float, int]] = set()
    # The unit of cost, a prefill of this document: timed right before each compile of a short
    # document (a median of several); a long one's prefill (seconds) is timed once, before
    # its first compile, where one timing is steady enough and several would cost minutes.
    long_doc = len(doc_tokens) > 1024
    prefill_s = time_prefill(loaded, prompter.context_ids(text), repeats=1) if long_doc else None
    for ratio in settings.ratios:
        for i, method in enumerate(methods):
            if not long_doc:
                prefill_s = time_prefill(loaded, prompter.context_ids(text))
            cart, seconds = compiled_cartridge(loaded, row, doc_sha, ratio, method, cart_dir, compile_fn, progress)
            indexed = "index" in cart.manifest
            read = ReadConfig.from_dict({"ratio": ratio, **method.read})
            memory = open_memory([cart], loaded, ["cartridge"], read=read)
            prefix = reading_prefix(loaded, read.prefix, read.prefix_file)
            k = memory.budget if indexed else cart.slots  # an indexed cartridge: its ask budget
            if settings.baselines and (ratio, k) not in truncated_at:  # the same KV budget, from the text's start
                truncated_at.add((ratio, k))
                truncated = loaded.tokenizer.decode(doc_tokens[:k], skip_special_tokens=True)
                add("truncate", ratio, None, answers(loaded, text_view(loaded, truncated), texts, ask), k)
                if settings.retrieve:
                    for fmt in settings.baseline_formats:
                        name = "retrieve" if fmt == "plain" else f"retrieve_{fmt}"
                        add(name, ratio, None, retrieved_answers(loaded, text, texts, k, ask, answer_format=fmt), k)
                    if settings.retrieve_dense:
                        add("retrieve_dense", ratio, None,
                            retrieved_answers(loaded, text, texts, k, ask, dense=dense_encoder()), k)
                    if settings.prefix_baselines and plain_prefix is not None:
                        add("retrieve_prefix", ratio, None, retrieved_answers(loaded, text, texts, k, ask, plain_prefix),
                            k)
            got = answers(loaded, memory, texts, ask, prefix, read.answer_format)
            add("cartridge", ratio, method.label, got, k)
            compiles_extra = {"read_entries": statistics.mean(memory.end(q) for q in texts)} if indexed else {}
            if settings.route and not indexed and len(cart.segments) > settings.route:
                add("cartridge_routed", ratio, method.label,
                    answers(loaded, open_memory([cart], loaded, ["cartridge"], route=settings.route), texts, ask, prefix))
            if settings.layout_check and i == 0:
                v1 = cart.buffer.moved(cart.rope, cart.segments[0]["token_count"])  # the buffer after its text
                add("cartridge_v1_layout", ratio, method.label, answers(loaded, Whole(v1, loaded), texts, ask, prefix))
                bf16 = cart.buffer.to(dtype=torch.bfloat16)
                add("cartridge_bf16", ratio, method.label, answers(loaded, Whole(bf16, loaded), texts, ask, prefix))
            compiles.append({"method": method.label, "ratio": ratio, "slots": k, "seconds": seconds,
                             "prefill_seconds": prefill_s, "prefill_equivalents": seconds / prefill_s,
                             "bytes": cart_dir.joinpath(_cart_name(loaded, doc_sha, ratio, method)).stat().st_size,
                             "prefix": prefix.name if prefix is not None else None, **compiles_extra})
            if settings.general_probes and not indexed:
                cart_general = [a.text for a in answers(loaded, memory, GENERAL_PROBES, ask, prefix)]
                general += [{"method": method.label, "ratio": ratio, "probe": g, "none": a, "cartridge": b}
                            for g, a, b in zip(GENERAL_PROBES, none_general, cart_general)]
    return {"id": row["id"], "title": row.get("title"), "doc_tokens": len(doc_tokens),
            "context_tokens": len(prompter.context_ids(text)), "compiles": compiles, "rows": rows,
            "general": general}


def dense_encoder():
    """The dense retriever (runtime/dense.py), loaded once per process."""
    from ..runtime.dense import DenseEncoder

    return DenseEncoder.shared()


def text_view(loaded, document: str | None):
    """The context turn with `document` in it (None: the plain instruction), read as text."""
    from ..runtime.reading import View

    return View.text(loaded.prompter.context_ids(document), document=document is not None)


def answers(loaded, source, questions: list[str], ask, prefix=None, answer_format: str = "plain") -> list:
    """Every question answered through the reading engine, in one batch: `source` is a memory
    (each question its own view; questions with one key share it) or one View for all."""
    from ..runtime.reading import Row, answer_rows

    views: dict = {}
    rows = []
    for q in questions:
        view = source.view(q) if hasattr(source, "mode") else source
        rows.append(Row(views.setdefault(view.key, view), loaded.prompter.query_ids(q, answer_format), q))
    return answer_rows(loaded, rows, ask, prefix, batch=True)


def retrieved_answers(loaded, text: str, questions: list[str], budget: int, ask, prefix=None,
                      answer_format: str = "plain", dense=None) -> list:
    """Each question answered from its own best sentences of the document (`budget` tokens,
    and the floor an indexed read has) in the prompt, all in one batched decode: BM25's
    sentences, or with `dense` (runtime.dense.DenseEncoder) the nearest by embedding."""
    from ..retrieval import retrieve
    from ..runtime.reading import Row, View, answer_rows

    def count(t: str) -> int:
        return len(loaded.prompter.encode(t))

    floor = ReadConfig().floor
    texts = [dense.retrieve(text, q, budget, count, floor) if dense is not None else
             retrieve(text, q, budget, count, floor) for q in questions]
    rows = [Row(View.text(loaded.prompter.context_ids(t)), loaded.prompter.query_ids(q, answer_format), q)
            for t, q in zip(texts, questions)]
    return answer_rows(loaded, rows, ask, prefix, batch=True)


def _cart_name(loaded, doc_sha: str, ratio: float, method: Method) -> str:
    """The cached cartridge's name: what changes the compile. Not the label, nor how an indexed
    cartridge is read (methods that differ only in `read` share one file); not the ratio for an
    indexed cartridge without a gist (the ratio only sets its ask budget)."""
    _, name, weights, settings = _method_key(method)[:4]
    if settings.get("index") and not settings.get("gist", True):
        ratio_key, settings = None, {k: v for k, v in settings.items() if k != "ratio"}
    else:
        ratio_key = ratio
    if not settings.get("index"):  # cartridges cached before indexed ones existed keep their names
        return f"{doc_sha[:12]}-r{ratio:g}-{_key(fp=loaded.fingerprint, m=_method_key(method), r=ratio)}.lcc"
    key = _key(fp=loaded.fingerprint, m=[name, weights, settings], r=ratio_key)
    return f"{doc_sha[:12]}-{'r%g-' % ratio if ratio_key else ''}{key}.lcc"


def compiled_cartridge(loaded, row, doc_sha, ratio, method: Method, cart_dir: Path, compile_fn,
                       progress: Progress = NO_PROGRESS) -> tuple[Cartridge, float]:
    """Compile (or reuse a cached) cartridge; returns it and its compile seconds (wall time
    of the whole compile, as `lcc compile` spends it)."""
    from ..format.cartridge import save_cartridge
    from ..errors import LccError

    path = cart_dir / _cart_name(loaded, doc_sha, ratio, method)
    if path.exists():
        try:
            cart = load_cartridge(path)
            return cart, float(cart.manifest["metrics"]["wall_seconds"])
        except (LccError, KeyError, TypeError, ValueError):
            pass  # a damaged cache entry is compiled again
    doc = Document(text=row["context"], sha256=doc_sha, name=f"{row['id']}.txt")
    started = time.perf_counter()
    cart = compile_fn(doc, method, ratio, progress)
    seconds = time.perf_counter() - started
    cart.manifest["metrics"]["wall_seconds"] = round(seconds, 3)
    save_cartridge(cart, path, overwrite=True)
    return load_cartridge(path), seconds  # as stored (int8 or int4 keys and values read back, as users read them)


def time_prefill(loaded, ids: list[int], repeats: int = 5) -> float:
    """Median seconds of one forward pass over the document's context turn: the unit of
    'prefill equivalents', timed right before the compile it divides (a median of several,
    because one timing on a busy machine can be off by 10x)."""
    from ..runtime.cache import prefill

    times = []
    with torch.inference_mode():
        prefill(loaded.model, ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            prefill(loaded.model, ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
