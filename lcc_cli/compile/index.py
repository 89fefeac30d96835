"""The indexed part of a cartridge: the document's own KV from the frozen model, in pages that
a question chooses at ask time (runtime/memory/paged.py `Paged`).

A buffer compiled before the question is known cannot hold the few sentences that answer it
(issue 29: every query-agnostic cartridge answered 0.05-0.07 of long-document questions at 16x,
BM25 retrieval of the question's sentences 0.32). So the cartridge keeps what any question may
need, the KV of every document token, and says how to find it:

1. The context turn (system header + document + end of turn) is prefilled by the frozen model,
   window by window when it is longer than the model's window: each later window re-encodes the
   header and the last `window_overlap` document tokens before its own (`overlap`), or carries
   the previous window's last entries as KV (`prefix`). Only each window's own tokens are kept.
2. The document's tokens are cut into pages: sentences (the `retrieve` baseline's splitter,
   mapped to tokens by the tokenizer's offsets) or fixed runs of `page_tokens`.
3. Each page keeps its text (for BM25) and, with `key_summaries`, the mean of its keys before
   RoPE (for selection by the question's own attention, as Quest and InfLLM summarise pages);
   every entry keeps its token id (for re-encoding a page's first tokens after the pages chosen
   before it, as EPIC does).

Entries are stored at the positions they were encoded at; a question's pages are re-laid at
consecutive positions when it reads them (keys re-rotated exactly). One prefill of compute.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..buffer import Buffer
from ..config import CompileConfig
from ..errors import InputError
from ..progress import NO_PROGRESS, Progress
from ..retrieval import chunks_of
from ..runtime.cache import cache_layers, forward, make_cache


@dataclass
class IndexResult:
    buffer: Buffer  # header, document and end-of-turn entries, at their encoded positions
    index: dict  # the manifest's `index` (entry offsets relative to the first index entry)
    tensors: dict  # `index.*` tensors
    token_count: int  # tokens of the context turn
    seconds: float


def build_index(loaded, text: str, cfg: CompileConfig, progress: Progress = NO_PROGRESS,
                name: str = "document") -> IndexResult:
    started = time.perf_counter()
    ids, header, tail, offsets, doc_start = _context(loaded, text)
    doc = range(header, len(ids) - tail)  # token indices of the document
    limit = min(cfg.window_tokens or 10**9, loaded.facts.max_positions or 10**9)
    chars = [(s - doc_start, e - doc_start) for s, e in offsets[header:len(ids) - tail]]
    # windows end where sentences start, so that a sentence is not cut in two pages
    starts = [header + first for first, _, _ in _sentence_pages(text, chars, [])] if cfg.pages == "sentence" else []
    windows = _plan(len(ids), header, tail, limit, cfg.window_overlap, starts)
    progress.start("windows", len(windows))
    progress.note(f"{name}: encoding {len(ids):,} tokens in {len(windows)} window{'s' if len(windows) > 1 else ''}")
    keys, values, positions, regions = _encode(loaded, ids, header, tail, windows, cfg, progress)
    buffer = Buffer(keys, values, positions)
    bounds = [w[1] - header for w in windows[:-1]]  # a page never spans two windows
    if cfg.pages == "sentence":
        spans = _sentence_pages(text, chars, bounds)
    else:
        spans = _fixed_pages(len(doc), cfg.page_tokens, bounds)
    pages = []
    for first, last, _ in spans:  # document token indices first..last-1
        page_text = text[chars[first][0]:chars[last - 1][1]].strip()  # what the page's entries hold
        # the windows partition the turn's tokens, so a token's index is its entry's
        pages.append({"start": header + first, "entries": last - first, "text": page_text})
    n = buffer.slots
    index = {"windows": regions, "pages": pages, "always": [[0, header], [n - tail, n]] if tail else [[0, header]],
             "doc_tokens": len(doc), "page_kind": cfg.pages, "window_mode": cfg.window_mode,
             "window_overlap": cfg.window_overlap, "summaries": ["key_mean"] if cfg.key_summaries else []}
    tensors = {"index.token_ids": torch.tensor(ids, dtype=torch.int32)}
    if cfg.key_summaries:
        tensors["index.key_mean"] = _key_means(buffer, pages, loaded.rope).to(torch.float16)
    return IndexResult(buffer, index, tensors, len(ids), time.perf_counter() - started)


def _context(loaded, text: str):
    """The context turn's ids and where the document sits in it: (ids, header tokens, tail
    tokens, each token's character span, the document's first character)."""
    p = loaded.prompter
    rendered = p.context_text(text)
    doc_start = rendered.rfind(text)
    if doc_start < 0 or not text:
        raise InputError("the document does not appear verbatim in its prompt (the chat template changed it)")
    enc = loaded.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    doc_end = doc_start + len(text)
    header = sum(1 for s, _ in offsets if s < doc_start)
    tail = sum(1 for s, _ in offsets if s >= doc_end)
    if len(ids) - header - tail < 1:
        raise InputError("the document has no tokens of its own")
    return ids, header, tail, offsets, doc_start


def _plan(n: int, header: int, tail: int, limit: int, overlap: int,
          starts: Sequence[int] = ()) -> list[tuple[int, int, int]]:
    """Windows over the context turn's n tokens, as (first, last, reread): each window's own
    tokens first..last-1, after `reread` document tokens before them (and the header) that it
    encodes again for context. The first window starts at 0 with the header; the last ends at n
    with the end of the turn; each fits `limit` positions. A window ends at the last of
    `starts` (sentence starts, ascending token indices) in its second half, if one is there."""
    overlap = min(overlap, max(0, (limit - header - tail) // 4))  # a window's own tokens are most of it
    out, first = [], 0
    while True:
        reread = min(overlap, first - header) if first else 0
        room = limit - (header + reread if first else 0)
        if room < 64:
            raise InputError(f"the model's {limit}-position window leaves no room for a document window "
                             f"(header {header} tokens, overlap {overlap})")
        if n - first <= room:
            out.append((first, n, reread))
            return out
        end = min(first + room, n - tail)
        cut = bisect.bisect_right(starts, end) - 1
        if end < n - tail and cut >= 0 and starts[cut] > first + room // 2:
            end = starts[cut]
        if end <= first:
            raise InputError(f"the end of the turn ({tail} tokens) does not fit a {limit}-position window")
        out.append((first, end, reread))
        first = end


def _encode(loaded, ids, header, tail, windows, cfg, progress: Progress = NO_PROGRESS):
    """Prefill each window and keep its own tokens' KV at the positions they were encoded at.
    Returns per-layer keys and values [kv_heads, entries, D], positions, and the manifest's
    window regions (entry offsets relative to the first index entry)."""
    model, rope = loaded.model, loaded.rope
    device = loaded.device
    layers = loaded.facts.num_layers
    keep_k: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    keep_v: list[list[torch.Tensor]] = [[] for _ in range(layers)]
    positions, regions, entry, carried = [], [], 0, None
    with torch.inference_mode():
        for w, (first, last, overlap) in enumerate(windows):
            if w == 0:
                cache, start, tokens = make_cache(None), 0, ids[:last]
            elif cfg.window_mode == "prefix":
                cache, start, tokens = make_cache(carried[0]), carried[1], ids[first:last]
            else:  # overlap: the header and the last `reread` tokens encoded again as text
                cache, start, tokens = make_cache(None), 0, ids[:header] + ids[first - overlap:last]
            forward(model, cache, start, input_ids=torch.tensor([tokens], device=device), logits_to_keep=1)
            layers = cache_layers(cache)
            own = len(tokens) if w == 0 else last - first
            total = start + len(tokens)
            for i, (k, v) in enumerate(layers):
                keep_k[i].append(k[0, :, -own:].float().cpu().clone())
                keep_v[i].append(v[0, :, -own:].float().cpu().clone())
            regions.append({"entry_start": entry, "entries": own, "position_start": total - own})
            positions.append(torch.arange(total - own, total))
            entry += own
            if cfg.window_mode == "prefix" and w + 1 < len(windows):
                carried = _carry(layers, header, windows[w + 1][2], total, rope)
            progress.advance("windows")
    keys = [torch.cat(parts, dim=1) for parts in keep_k]
    values = [torch.cat(parts, dim=1) for parts in keep_v]
    return keys, values, torch.cat(positions), regions


def _carry(layers, header: int, overlap: int, total: int, rope):
    """The next window's starting cache (`prefix` mode): the header's KV, then this window's
    last `overlap` entries moved to follow it."""
    out = []
    for k, v in layers:
        last_k = rope.shift(k[0, :, total - overlap:total], -(total - overlap - header))
        out.append((torch.cat([k[0, :, :header], last_k], dim=1)[None], torch.cat([v[0, :, :header],
                                                                                  v[0, :, total - overlap:total]],
                                                                                 dim=1)[None]))
    return out, header + overlap


def _sentence_pages(text: str, spans: list[tuple[int, int]], bounds: list[int]) -> list[tuple[int, int, str]]:
    """Sentences as (first token, last token + 1, text); `spans` are the document tokens'
    character spans in `text`. A token belongs to the sentence whose text, with the whitespace
    before it, holds its first character (a leading space starts the next sentence's token)."""
    starts, pos = [], 0
    chunks = chunks_of(text)
    for chunk in chunks:
        at = text.find(chunk, pos)
        at = pos if at < 0 else at
        starts.append(at)
        pos = at + len(chunk)
    if not chunks:
        return _fixed_pages(len(spans), 32, bounds)
    # sentence i owns the characters from the end of sentence i-1 to its own end
    owners, i = [], 0
    edges = [starts[j - 1] + len(chunks[j - 1]) if j else 0 for j in range(len(chunks))]
    for s, _ in spans:
        while i + 1 < len(edges) and s >= edges[i + 1]:
            i += 1
        owners.append(i)
    cut = set(bounds)
    pages, first = [], 0
    for t in range(1, len(spans) + 1):
        if t == len(spans) or owners[t] != owners[first] or t in cut:
            pages.append((first, t, chunks[owners[first]]))
            first = t
    return pages


def _fixed_pages(count: int, size: int, bounds: list[int]) -> list[tuple[int, int, str]]:
    """Runs of `size` tokens (texts filled in by the caller's spans: see build_index)."""
    pages, first, cuts = [], 0, sorted(set(bounds) | {count})
    for end in cuts:
        while first < end:
            pages.append((first, min(first + size, end), ""))
            first = min(first + size, end)
    return pages


def _key_means(buffer: Buffer, pages: list[dict], rope) -> torch.Tensor:
    """Each page's mean key before RoPE, per layer and KV head: [pages, layers, kv_heads, D]."""
    out = []
    for page in pages:
        a, b = page["start"], page["start"] + page["entries"]
        pos = buffer.positions[a:b]
        out.append(torch.stack([rope.shift(k[:, a:b], -pos).mean(dim=1) for k in buffer.keys]))
    return torch.stack(out) if out else torch.zeros(0, len(buffer.keys), *buffer.keys[0].shape[::2])
