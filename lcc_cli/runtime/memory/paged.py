"""`Paged` memory: indexed cartridges (compile/index.py), each question reading the pages it
chooses, up to a budget, re-laid at consecutive positions.

What a question reads, in cache order: the gist of each cartridge (its compiled buffer, when it
has one and `gist` is on), the context turn's header (the system instruction up to
"Document:"), the chosen pages in document order, and the end of the turn. Only the budget's
worth of pages and gist is counted: header and end are what `retrieve` puts around its text
too. Pages are read by ranged reads (format v3), so a question loads its pages and no others,
every byte checked.

Why consecutive positions: in the prototype (issue 29, 220 questions) the same pages read at
their original positions, with gaps between them, answered 0.07 against 0.28 re-laid. Keys are
re-rotated exactly (buffer.Rope), so each page keeps its internal distances.

`repair` re-encodes each chosen page's first tokens after the entries laid before it (EPIC,
arXiv 2410.15332): the page was encoded beside sentences that are no longer there. `reencode`
re-encodes the chosen pages whole when they are few tokens in all (a paragraph's budget): then
that costs little, and it answered as well as retrieval where stored pages fell short (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch

from ...buffer import Buffer
from ...config import ReadConfig
from ...errors import CartridgeError, UsageError
from .select import BM25, attention_scores, fused, question_queries


def default_budget(tokens: int, ratio: float) -> int:
    """Entries a question reads of a document of `tokens` at `ratio`: as many as a cartridge of
    that ratio holds."""
    return max(1, math.ceil(tokens / ratio))


@dataclass(frozen=True)
class Page:
    source: int  # which cartridge
    number: int  # its page number there
    start: int  # entry index in its cartridge
    entries: int
    text: str


class Source:
    """One indexed cartridge as a question reads it: its manifest, index tensors, and ranged
    reads (a CartridgeFile, or a Cartridge already in memory)."""

    def __init__(self, name: str, handle):
        self.name, self.handle = name, handle
        self.manifest = handle.manifest
        self.index = handle.manifest.get("index")
        if self.index is None:
            raise UsageError(f"{name} is not an indexed cartridge; it cannot be read beside indexed ones",
                             hint="compile it with --index, or ask it on its own")
        # a file read by range (CartridgeFile, or one the server holds open) or a Cartridge in memory
        self.tensors = (handle.index if hasattr(handle, "read") else handle.index_tensors) or {}
        self.gist_entries = sum(s["slots"] for s in self.manifest["buffer"]["segments"])

    @property
    def block(self) -> int:
        return int(self.manifest["buffer"].get("block_entries") or 1)

    def read(self, start: int, stop: int) -> Buffer:
        if hasattr(self.handle, "read"):
            return self.handle.read(start, stop)
        return self.handle.buffer.select(start, stop)

    @property
    def doc_tokens(self) -> int:
        return int(self.manifest["source"]["token_count"])

    @property
    def ratio(self) -> float:
        return float(self.manifest["source"].get("ratio") or self.manifest["compile"].get("ratio") or 16.0)


class Paged:
    mode = "indexed"

    def __init__(self, loaded, sources: list[Source], cfg: ReadConfig | None = None):
        self.loaded, self.sources, self.cfg = loaded, sources, cfg or ReadConfig()
        self.pages = [Page(i, n, p["start"], p["entries"], p["text"])
                      for i, s in enumerate(sources) for n, p in enumerate(s.index["pages"])]
        if not self.pages:
            raise CartridgeError("the indexed cartridges hold no pages")
        if self.cfg.layout == "gaps" and (len(sources) > 1 or len(sources[0].index["windows"]) > 1):
            raise UsageError("layout gaps keeps each page where it was encoded: one cartridge of one window only",
                             field="layout")
        self.bm25 = BM25([p.text for p in self.pages]) if self.cfg.selector != "attention" else None
        self._summaries = None
        self._always: tuple[Buffer, Buffer] | None = None
        self._chosen: dict[str, tuple] = {}
        self._view: tuple[Hashable, Buffer] | None = None
        # a gist is read before the header, consecutively: gaps keep pages where they were encoded, so no gist
        self.gist = self._gist() if self.cfg.gist and self.cfg.layout != "gaps" else []
        self.budget = self._budget()

    # --- what a question reads ---------------------------------------------------------------

    def _budget(self) -> int:
        """Entries of pages and gist: --budget, or the documents' tokens / --ratio (default:
        each cartridge's own compile ratio), as a cartridge of that ratio would hold."""
        if self.cfg.budget is not None:
            return self.cfg.budget
        return sum(default_budget(s.doc_tokens, self.cfg.ratio or s.ratio) for s in self.sources)

    def _gist(self) -> list[Buffer]:
        return [s.read(0, s.gist_entries) for s in self.sources if s.gist_entries]

    def always(self) -> tuple[Buffer, Buffer]:
        """The header and the end of the turn (the first cartridge's: the same for every
        cartridge of one model)."""
        if self._always is None:
            s = self.source(self.first_source())
            (a, b), (c, d) = s.index["always"][0], s.index["always"][-1]
            self._always = s.read(a, b), (s.read(c, d) if (c, d) != (a, b) else s.read(b, b))
        return self._always

    def first_source(self):
        return 0

    def scores(self, question: str) -> list[float]:
        if self.cfg.selector == "bm25":
            return self.bm25.scores(question)
        attention = self._attention(question)
        return attention if self.cfg.selector == "attention" else fused(self.bm25.scores(question), attention)

    def rank(self, question: str) -> list[Page]:
        """Every page, best first."""
        scores = self.scores(question)
        return [self.pages[i] for i in sorted(range(len(self.pages)), key=lambda i: (-scores[i], i))]

    def _attention(self, question: str) -> list[float]:
        if self._summaries is None:
            if any("index.key_mean" not in s.tensors for s in self.sources):
                raise UsageError("these cartridges store no key summaries; use --selector bm25", field="selector")
            self._summaries = torch.cat([s.tensors["index.key_mean"] for s in self.sources])
        head, tail = self.always()
        context = Buffer.laid_out([head, tail], self.loaded.rope).to(self.loaded.device, self.loaded.dtype)
        return attention_scores(question_queries(self.loaded, context, question), self._summaries,
                                self.loaded.facts.head_dim)

    def choose(self, question: str) -> tuple[tuple[Page, int], ...]:
        """(page, entries read) of the chosen pages, in document order: the best pages that fit
        the budget together, each whole (a page that would not fit is passed over for the next);
        if even the best page alone is over the budget, its first entries."""
        if question in self._chosen:
            return self._chosen[question]
        room = self.budget - sum(g.slots for g in self.gist)
        chosen, used = [], 0
        for page in self.rank(question):
            if used >= room:
                break
            if used + page.entries <= room:
                chosen.append((page, page.entries))
                used += page.entries
            elif not chosen:
                chosen.append((page, room))  # the best page alone is over the budget: its start
                used = room
        out = tuple(sorted(chosen, key=lambda c: (c[0].source, c[0].start)))
        if len(self._chosen) > 4096:
            self._chosen.clear()
        self._chosen[question] = out
        return out

    def key(self, question: str) -> Hashable:
        return self.choose(question)

    def view(self, question: str) -> Buffer:
        key = self.choose(question)
        if self._view is not None and self._view[0] == key:
            return self._view[1]
        head, tail = self.always()
        pages = self._read_pages(key)
        if self.cfg.layout == "gaps":
            buffer = Buffer.concat([head, *pages, tail])
        else:
            buffer = Buffer.laid_out([*self.gist, head, *pages, tail], self.loaded.rope)
        buffer = buffer.to(self.loaded.device, self.loaded.dtype)
        per_page = self._repair_tokens(key)
        if per_page:
            buffer = self._repair(buffer, key, head.slots + sum(g.slots for g in self.gist), per_page)
        self._view = (key, buffer)
        return buffer

    def source(self, ident) -> Source:
        """The cartridge a page's `source` names (here an index into `sources`)."""
        return self.sources[ident]

    def _read_pages(self, key) -> list[Buffer]:
        """The chosen pages' entries, each block read once: pages whose blocks touch are read
        in one ranged read (format v3 reads whole blocks, each checked)."""
        runs: list[list] = []  # [page source, first entry, last entry, [(page start, entries)]]
        for page, n in key:
            block = self.source(page.source).block
            if runs and runs[-1][0] == page.source and page.start // block <= (runs[-1][2] - 1) // block + 1:
                runs[-1][2] = max(runs[-1][2], page.start + n)
                runs[-1][3].append((page.start, n))
            else:
                runs.append([page.source, page.start, page.start + n, [(page.start, n)]])
        out = []
        for source, first, last, members in runs:
            whole = self.source(source).read(first, last)
            out += [whole.select(start - first, start - first + n) for start, n in members]
        return out

    def read_pages(self, question: str) -> list[dict]:
        """What `--show-pages` prints: each page the question read, with its cartridge and text."""
        out, key = [], self.choose(question)
        per_page = self._repair_tokens(key)
        for page, n in key:
            source = self.source(page.source)
            text = page.text
            ids = source.tensors.get("index.token_ids")
            if n < page.entries and ids is not None:  # the best page cut at the budget: the part read
                text = self.loaded.prompter.tokenizer.decode(ids[page.start:page.start + n].tolist()).strip()
            out.append({"cartridge": source.name, "source": source.manifest["source"].get("name"),
                        "page": page.number, "start": page.start, "entries": n, "page_entries": page.entries,
                        "reencoded": min(per_page, n) if ids is not None else 0,
                        "text": text})
        return out

    # --- EPIC-style repair ----------------------------------------------------------------

    def _repair_tokens(self, key) -> int:
        """Tokens of each chosen page to re-encode: all of them when the pages hold at most
        `reencode` entries together, else the first `repair`."""
        if self.cfg.layout != "gaps" and 0 < sum(n for _, n in key) <= self.cfg.reencode:
            return max(n for _, n in key)
        return self.cfg.repair

    def _repair(self, buffer: Buffer, key, first_page: int, per_page: int) -> Buffer:
        """Re-encode the first `per_page` tokens of every chosen page after everything laid
        before it, and put their new KV in place of the stored one.

        One forward pass for all pages, not one per page: the repaired tokens go in as one
        sequence over the whole view, and a mask lets each see exactly what a page-by-page pass
        would (every stored entry at an earlier position, except the stored copies of repaired
        tokens, and the repaired tokens at earlier positions), so the result is the same."""
        from ..bias import slot_biases
        from ..cache import cache_layers, forward_rows, make_cache

        at, where, tokens = first_page, [], []
        for page, n in key:
            ids = self.source(page.source).tensors.get("index.token_ids")
            r = min(per_page, n)
            if ids is not None and r:
                offset = page.start - self.source(page.source).gist_entries
                tokens += ids[offset: offset + r].long().tolist()
                where += range(at, at + r)
            at += n
        if not where:
            return buffer
        device = self.loaded.device
        index = torch.tensor(where)
        positions = buffer.positions[index]
        stored = buffer.positions[None, :] < positions[:, None]  # [Q, T]: entries laid before each token
        stored[:, index] = False  # a repaired token's stored copy is what it replaces
        mask = torch.cat([stored, positions[None, :] <= positions[:, None]], dim=1)
        cache = make_cache(buffer.cache_layers())
        with torch.inference_mode(), slot_biases(self.loaded.model, buffer.bias):
            forward_rows(self.loaded.model, cache, positions[None].to(device), mask[None, None].to(device),
                         input_ids=torch.tensor([tokens], device=device), logits_to_keep=1)
        keys, values = [k.clone() for k in buffer.keys], [v.clone() for v in buffer.values]
        for layer, (k, v) in enumerate(cache_layers(cache)):
            keys[layer][:, index] = k[0, :, buffer.slots:]
            values[layer][:, index] = v[0, :, buffer.slots:]
        return Buffer(keys, values, buffer.positions, buffer.bias)
