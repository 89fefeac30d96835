"""`LibraryMemory`: a folder of indexed cartridges asked as one (issue 30).

A question's candidate pages come from the library's SQLite FTS5 index (library/index.py,
bm25() over every page of every cartridge); the best that fit the budget are read from their
cartridges, however many, and laid out as `Paged` lays them out: the context turn's header, the
pages in (cartridge, document) order, the end of the turn. Only the cartridges that hold chosen
pages are opened (each kept open, a bounded number at a time), and each is checked against the
checksum the index recorded before a page of it is read: a cartridge replaced since it was
indexed is re-indexed and the question chooses again, so no stale index entry is ever read.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict

from ...buffer import Buffer
from ...config import ReadConfig
from ...errors import CartridgeError, LccError, UsageError
from ...format.cartridge import open_held
from .paged import Page, Paged, Source
from .select import attention_scores, fused, question_queries

CANDIDATES = 64  # pages the index returns per question, before the budget (and any re-ranking)
OPEN_LIMIT = 64  # cartridges kept open at once (each holds its header, block table, summaries)
DEFAULT_RATIO = 16.0


class Stale(Exception):
    """A cartridge changed since the index was written."""


class LibraryMemory(Paged):
    mode = "library"

    def __init__(self, loaded, library, cfg: ReadConfig | None = None, check=None):
        self.loaded, self.library, self.cfg = loaded, library, cfg or ReadConfig()
        if self.cfg.layout == "gaps":
            raise UsageError("layout gaps keeps pages where they were encoded: one cartridge only", field="layout")
        self.check = check  # check(source) -> None, raises for a cartridge the model cannot read
        self._open: OrderedDict[str, Source] = OrderedDict()
        self._checksums: dict[str, str] = {}
        self._chosen: dict[str, tuple] = {}
        self._view = None
        self._always = None
        self._first: str | None = None
        self.gist = []  # a gist is one document's buffer: a library reads pages only
        self.budget = self._budget()
        self.pages = []

    def _budget(self) -> int:
        """--budget, or the median cartridge's document tokens / --ratio (default 16)."""
        if self.cfg.budget is not None:
            return self.cfg.budget
        tokens = [c["tokens"] or 0 for c in self.library.cartridges()]
        if not tokens:
            raise UsageError(f"the library {self.library.folder} holds no indexed cartridges",
                             hint="compile documents into it with `lcc compile ... --index -o DIR/`")
        return max(1, math.ceil(statistics.median(tokens) / (self.cfg.ratio or DEFAULT_RATIO)))

    # --- sources, opened on demand and checked against the index ----------------------------

    def source(self, ident: str) -> Source:
        held = self._open.get(ident)
        if held is not None and held.handle.meta.get("lcc_checksum") == self._checksums.get(ident):
            self._open.move_to_end(ident)
            return held  # still the cartridge the index last named
        if "/" in ident or ident.startswith(".") or not ident.endswith(".lcc"):  # a name from the index file
            raise Stale(ident)
        try:
            handle = open_held(self.library.folder / ident, ident)  # never through a link
        except (LccError, OSError) as exc:
            raise Stale(ident) from exc
        if handle.meta.get("lcc_checksum") != self._checksums.get(ident):
            raise Stale(ident)
        source = Source(ident, handle)
        if self.check is not None:
            self.check(source)
        self._open[ident] = source
        while len(self._open) > OPEN_LIMIT:
            self._open.popitem(last=False)
        return source

    def first_source(self) -> str:
        return self._first  # the first cartridge a question read: its header and end of turn


    # --- choosing ---------------------------------------------------------------------------

    def rank(self, question: str) -> list[Page]:
        hits = self.library.search(question, CANDIDATES, self.loaded.fingerprint)
        for h in hits:
            self._checksums[h.cartridge] = h.checksum
        pages = [Page(h.cartridge, h.number, h.start, h.entries, h.text) for h in hits]
        if self.cfg.selector == "bm25" or not pages:
            return pages
        attention = self._candidate_attention(question, pages)
        if self.cfg.selector == "attention":
            order = sorted(range(len(pages)), key=lambda i: (-attention[i], i))
        else:
            fts_rank = [-float(i) for i in range(len(pages))]  # the index's order is its ranking
            scores = fused(fts_rank, attention)
            order = sorted(range(len(pages)), key=lambda i: (-scores[i], i))
        return [pages[i] for i in order]

    def _candidate_attention(self, question: str, pages: list[Page]) -> list[float]:
        import torch

        if any("index.key_mean" not in self.source(p.source).tensors for p in pages):
            raise UsageError("the library's cartridges store no key summaries; use --selector bm25", field="selector")
        summaries = torch.stack([self.source(p.source).tensors["index.key_mean"][p.number] for p in pages])
        self._first = self._first or pages[0].source
        head, tail = self.always()
        context = Buffer.laid_out([head, tail], self.loaded.rope).to(self.loaded.device, self.loaded.dtype)
        return attention_scores(question_queries(self.loaded, context, question), summaries,
                                self.loaded.facts.head_dim)

    def forget_choices(self) -> None:
        self._chosen.clear()
        self._view, self._always, self._first = None, None, None

    def checksums(self, question: str) -> tuple[str, ...]:
        """The checksums of the cartridges `question` reads (part of a batch key: a cartridge
        replaced under the same name never shares a batch with its old self)."""
        return tuple(sorted({self._checksums[p.source] for p, _ in self.choose(question)}))

    def choose(self, question: str):
        return self._retry(lambda: super(LibraryMemory, self).choose(question))

    def view(self, question: str) -> Buffer:
        def build():
            key = self.choose(question)
            if not key:
                raise UsageError("no page of the library matches the question's words",
                                 hint="ask with other words, or check `lcc index DIR`")
            self._first = self._first or key[0][0].source
            return super(LibraryMemory, self).view(question)

        return self._retry(build)

    def _retry(self, work):
        """Run `work`; if a cartridge changed since it was indexed (Stale: its checksum is not the
        indexed one) or while it was read (a CartridgeError from a block), index the library again
        and choose again: the old index's idea of a cartridge is never read."""
        for attempt in (0, 1, 2):
            try:
                return work()
            except (Stale, CartridgeError) as exc:
                if attempt == 2:
                    if isinstance(exc, Stale):
                        raise CartridgeError(f"{exc} keeps changing while it is read") from None
                    raise
                if isinstance(exc, Stale):
                    self.library.forget(str(exc))  # even one changed in place with its time stamp restored
                self._open.clear()
                self.forget_choices()
                self.library.refresh()
        raise AssertionError("unreachable")
