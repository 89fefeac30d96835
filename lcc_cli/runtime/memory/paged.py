"""`Paged` memory: indexed cartridges (compile/index.py), each question reading the pages it
chooses, up to a budget, re-laid at consecutive positions.

What a question reads, in cache order: the gist of each cartridge (its compiled buffer, when it
has one and `gist` is on), the context turn's header (the system instruction up to
"Document:"), the chosen pages in document order, and the end of the turn. Only the pages are
counted against the budget: header and end are what `retrieve` puts around its text too, and a
gist is read beside the pages (it once took the whole budget at the default ratio). Pages are read by ranged reads (format v3), so a question loads its pages and no others,
every byte checked.

Why consecutive positions: in the prototype (issue 29, 220 questions) the same pages read at
their original positions, with gaps between them, answered 0.07 against 0.28 re-laid. Keys are
re-rotated exactly (buffer.Rope), so each page keeps its internal distances.

`reencode` re-encodes the chosen pages whole when they are few tokens in all (a paragraph's
budget), `repair` each page's first tokens otherwise (EPIC, arXiv 2410.15332: a page was
encoded beside sentences that are no longer there). Re-encoded tokens are not encoded here:
the view names them (`View.fresh`, at the positions their stored copies would take, which are
left out), and the reading engine encodes them in the question's own forward pass.

What a read shows (`View.pages`, `--show-pages`, the server's `lcc.pages`) comes from the
cartridge: its page table and the token ids of the entries read, decoded. A page's text in the
manifest only ever ranks pages; it is never what is shown as read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Hashable

import torch

from ...buffer import Buffer
from ...config import ReadConfig
from ...errors import CartridgeError, UsageError
from ..reading import Page as PageRead, View
from .select import BM25, attention_scores, question_queries, selector


def default_budget(tokens: int, ratio: float) -> int:
    """Entries a question reads of a document of `tokens` at `ratio`: as many as a cartridge of
    that ratio holds."""
    return max(1, math.ceil(tokens / ratio))


@dataclass(frozen=True)
class Page:
    source: Hashable  # which cartridge: an index into `sources`, or a library's file name
    number: int  # its page number there
    start: int  # entry index in its cartridge
    entries: int
    text: str  # what ranks it (BM25); never what is shown as read


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

    @property
    def positions(self) -> torch.Tensor:
        return self.handle.positions if hasattr(self.handle, "read") else self.handle.buffer.positions

    def read(self, start: int, stop: int) -> Buffer:
        if hasattr(self.handle, "read"):
            return self.handle.read(start, stop)
        return self.handle.buffer.select(start, stop)

    def page(self, number: int) -> Page:
        p = self.index["pages"][number]
        return Page(self.name, number, p["start"], p["entries"], p["text"])

    def token_ids(self, start: int, count: int) -> list[int] | None:
        """The token ids of entries start..start+count-1 (None: the cartridge stores none)."""
        ids = self.tensors.get("index.token_ids")
        if ids is None:
            return None
        offset = start - self.gist_entries
        return ids[offset:offset + count].long().tolist()

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
        self.selector = selector(self.cfg.selector)
        self._bm25: BM25 | None = None
        self._summaries = None
        self._always: tuple[Buffer, Buffer] | None = None
        self._chosen: dict[str, tuple] = {}
        # a gist is read before the header, consecutively: gaps keep pages where they were encoded, so no gist
        self.gist = self._gist() if self.cfg.gist and self.cfg.layout != "gaps" else []
        self.budget = self._budget()

    # --- what a question reads ---------------------------------------------------------------

    def _budget(self) -> int:
        """Entries of pages: --budget, or the documents' tokens / --ratio (default: each
        cartridge's own compile ratio), as a cartridge of that ratio would hold."""
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

    def source(self, ident) -> Source:
        """The cartridge a page's `source` names (here an index into `sources`)."""
        return self.sources[ident]

    # --- scoring (select.Scorer) -------------------------------------------------------------

    def text_scores(self, question: str, pages: list[Page]) -> list[float]:
        if self._bm25 is None:
            self._bm25 = BM25([p.text for p in self.pages])
        return self._bm25.scores(question)  # `pages` is every page, in order

    def attention_scores(self, question: str, pages: list[Page]) -> list[float]:
        if self._summaries is None:
            self._summaries = torch.cat([self._summary(s) for s in self.sources])
        return self._attention(question, self._summaries)

    def _summary(self, source: Source) -> torch.Tensor:
        for need in self.selector.needs:
            if f"index.{need}" not in source.tensors:
                raise UsageError(f"{source.name} stores no key summaries ({need}), which --selector "
                                 f"{self.selector.name} needs; use --selector bm25", field="selector")
        return source.tensors["index.key_mean"]

    def _attention(self, question: str, summaries: torch.Tensor) -> list[float]:
        head, tail = self.always()
        context = Buffer.laid_out([head, tail], self.loaded.rope).to(self.loaded.device, self.loaded.dtype)
        return attention_scores(question_queries(self.loaded, context, question), summaries,
                                self.loaded.facts.head_dim)

    def rank(self, question: str) -> list[Page]:
        """Every page, best first."""
        scores = self.selector.score(self, question, self.pages)
        return [self.pages[i] for i in sorted(range(len(self.pages)), key=lambda i: (-scores[i], i))]

    def choose(self, question: str) -> tuple[tuple[Page, int], ...]:
        """(page, entries read) of the chosen pages, in document order: the best pages that fit
        the budget together, each whole (a page that would not fit is passed over for the next).
        A read never starves (`floor`): the best page is read whole when it alone is over the
        budget, and cut only past the floor; a document whose pages hold no more than the
        floor is read whole."""
        if question in self._chosen:
            return self._chosen[question]
        room = self.budget  # pages only: a gist is read beside them, not out of their budget
        floor = self.cfg.floor
        chosen, used = [], 0
        if self.pages and sum(p.entries for p in self.pages) <= max(room, floor):  # a short document: all of it
            chosen = [(p, p.entries) for p in self.pages]
        for page in self.rank(question) if not chosen else ():
            if used >= room:
                break
            if used + page.entries <= room:
                chosen.append((page, page.entries))
                used += page.entries
            elif not chosen:  # the best page alone is over the budget: whole up to the floor, else its start
                take = min(page.entries, max(room, floor))
                chosen.append((page, take))
                used = max(room, take)
        out = tuple(sorted(chosen, key=lambda c: (c[0].source, c[0].start)))
        if len(self._chosen) > 4096:
            self._chosen.clear()
        self._chosen[question] = out
        return out

    def key(self, question: str) -> Hashable:
        return self.choose(question)

    def end(self, question: str) -> int:
        """Where the question's prompt starts (without a reading prefix), from the choice alone."""
        head, tail = self.always()
        if self.cfg.layout == "gaps":
            return int(tail.positions.max()) + 1 if tail.slots else int(head.positions.max()) + 1
        return sum(g.slots for g in self.gist) + head.slots + sum(n for _, n in self.choose(question)) + tail.slots

    def view(self, question: str) -> View:
        started = time.perf_counter()
        key = self.choose(question)
        head, tail = self.always()
        pages = self._read_pages(key)
        parts = [head, *pages, tail] if self.cfg.layout == "gaps" else [*self.gist, head, *pages, tail]
        buffer = Buffer.concat(parts) if self.cfg.layout == "gaps" else Buffer.laid_out(parts, self.loaded.rope)
        # where each chosen page starts in the buffer (cache order = position order here)
        first_page = len(self.gist) + 1 if self.cfg.layout != "gaps" else 1
        at = [sum(p.slots for p in parts[:first_page + i]) for i in range(len(pages))]
        fresh, where = [], []
        shown = self._shown_pages(key)
        for (page, n), start, info in zip(key, at, shown):
            r = info.reencoded
            fresh += self.source(page.source).token_ids(page.start, r) if r else []
            where += range(start, start + r)
        fresh_positions = buffer.positions[where].tolist() if where else []
        if where:  # the stored copies of re-encoded tokens are left out: the engine encodes them
            keep = torch.ones(buffer.slots, dtype=torch.bool)
            keep[where] = False
            buffer = buffer.take(keep.nonzero().squeeze(-1))
        return View(buffer, fresh, fresh_positions, shown, self._view_key(question),
                    time.perf_counter() - started)

    def _view_key(self, question: str) -> Hashable:
        return ("pages", id(self), self.choose(question))

    def _shown_pages(self, key) -> list[PageRead]:
        """What `--show-pages` prints of each page read: its text as the token ids of the
        entries read (the manifest's text where the cartridge stores no ids), and how many of
        them are re-encoded."""
        per_page = self._reencode_tokens(key)
        out = []
        for page, n in key:
            source = self.source(page.source)
            ids = source.token_ids(page.start, n)
            text = page.text if ids is None else self.loaded.tokenizer.decode(ids, skip_special_tokens=False).strip()
            out.append(PageRead(source.name, source.manifest["source"].get("name"), page.number, page.start, n,
                                page.entries, min(per_page, n) if ids is not None else 0, text))
        return out

    def read_pages(self, question: str) -> list[PageRead]:
        """What `--show-pages` prints: each page the question reads, with its cartridge and text."""
        return self._shown_pages(self.choose(question))

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

    def _reencode_tokens(self, key) -> int:
        """Tokens of each chosen page to re-encode: all of them when the pages hold at most
        `reencode` entries together, else the first `repair`."""
        if self.cfg.layout != "gaps" and 0 < sum(n for _, n in key) <= self.cfg.reencode:
            return max(n for _, n in key)
        return self.cfg.repair
