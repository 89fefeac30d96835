"""`LibraryMemory`: a folder of indexed cartridges asked as one (issue 30).

A question's candidate pages come from the library's SQLite FTS5 index (library/index.py,
bm25() over every page of every cartridge); the best that fit the budget are read from their
cartridges, however many, and laid out as `Paged` lays them out: the context turn's header, the
pages in (cartridge, document) order, the end of the turn. Only the cartridges that hold chosen
pages are opened (each kept open, a bounded number at a time).

The index only *chooses*. Before a page of a cartridge is read, the cartridge's checksum is
compared with the one indexed, and each chosen row with the cartridge's own page table (entry
range and text): a cartridge replaced since it was indexed, or a row that disagrees with its
cartridge (an index edited by hand), makes the library re-index that cartridge and the
question choose again. What is read and what is shown come from the cartridge alone.

Budget: `--budget`, or each candidate cartridge's own document tokens / its own compile ratio
(`--ratio` overrides the ratio), so that a folder of ratio-8 cartridges reads a ratio-8
budget. A question whose words match no page is answered without the library (the plain
model's own system turn) and says so: its view reads no pages.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from ...config import ReadConfig
from ...errors import CartridgeError, LccError, UsageError
from ...format.cartridge import open_held
from ..reading import View
from .paged import Page, Paged, Source, default_budget
from .select import selector

CANDIDATES = 64  # pages the index returns per question, before the budget (and any re-ranking)
OPEN_LIMIT = 64  # cartridges kept open at once (each holds its header, block table, summaries)
DEFAULT_RATIO = 16.0


class Stale(Exception):
    """A cartridge changed since the index was written, or an index row disagrees with it."""


class LibraryMemory(Paged):
    mode = "library"

    def __init__(self, loaded, library, cfg: ReadConfig | None = None, check=None):
        self.loaded, self.library, self.cfg = loaded, library, cfg or ReadConfig()
        if self.cfg.layout == "gaps":
            raise UsageError("layout gaps keeps pages where they were encoded: one cartridge only", field="layout")
        self.selector = selector(self.cfg.selector)
        self.check = check  # check(source) -> None, raises for a cartridge the model cannot read
        self.skipped: dict[str, str] = {}  # cartridges refused when read, and why
        self._open: OrderedDict[str, Source] = OrderedDict()
        self._checksums: dict[str, str] = {}
        self._chosen: dict[str, tuple] = {}
        self._always = None
        self._first: str | None = None
        self.gist = []  # a gist is one document's buffer: a library reads pages only
        self.pages = []  # never all known at once: a library is never "a short document"
        if not self.library.cartridges():
            raise UsageError(f"the library {self.library.folder} holds no indexed cartridges",
                             hint="compile documents into it with `lcc compile ... --index -o DIR/`")

    def budget_for(self, hits) -> int:
        """--budget; else the entries a question reads of the best candidate's cartridge: its
        document tokens / its own ratio (or --ratio)."""
        if self.cfg.budget is not None:
            return self.cfg.budget
        best = self.source(hits[0].source) if hits else None
        if best is None:
            return 1
        return default_budget(best.doc_tokens, self.cfg.ratio or best.ratio)

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
            try:
                self.check(source)
            except LccError as exc:  # one cartridge the model cannot read never takes the library down
                self.library.refuse(ident, exc.message)
                self.skipped[ident] = exc.message
                raise Stale(ident) from exc
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
        if not pages:
            return pages
        scores = self.selector.score(self, question, pages)
        return [pages[i] for i in sorted(range(len(pages)), key=lambda i: (-scores[i], i))]

    def text_scores(self, question: str, pages: list[Page]) -> list[float]:
        return [-float(i) for i in range(len(pages))]  # the index's order is its ranking

    def attention_scores(self, question: str, pages: list[Page]) -> list[float]:
        import torch

        summaries = torch.stack([self._summary(self.source(p.source))[p.number] for p in pages])
        self._first = self._first or pages[0].source
        return self._attention(question, summaries)

    def forget_choices(self) -> None:
        self._chosen.clear()
        self._always, self._first = None, None

    def choose(self, question: str):
        return self._retry(lambda: self._choose(question))

    def _choose(self, question: str):
        if question in self._chosen:
            return self._chosen[question]
        ranked = self.rank(question)
        self.budget = self.budget_for(ranked)
        chosen = Paged.choose(self, question)
        checked = tuple((self._checked(page), n) for page, n in chosen)
        self._chosen[question] = checked
        return checked

    def _checked(self, page: Page) -> Page:
        """The page as its cartridge's own page table has it; Stale if the index row disagrees."""
        source = self.source(page.source)
        pages = source.index["pages"]
        if not 0 <= page.number < len(pages):
            raise Stale(page.source)
        own = source.page(page.number)
        if (own.start, own.entries, own.text) != (page.start, page.entries, page.text):
            raise Stale(page.source)  # an index row edited, or a stale one: re-index the cartridge
        return own

    def _view_key(self, question: str) -> Hashable:
        return ("library", self.checksums(question), self.choose(question))

    def checksums(self, question: str) -> tuple[str, ...]:
        """The checksums of the cartridges `question` reads (part of a batch key: a cartridge
        replaced under the same name never shares a batch with its old self)."""
        return tuple(sorted({self._checksums[p.source] for p, _ in self.choose(question)}))

    def end(self, question: str) -> int:
        key = self.choose(question)
        if not key:
            return len(self.loaded.prompter.context_ids(None))
        self._first = self._first or key[0][0].source
        return self._retry(lambda: Paged.end(self, question))

    def view(self, question: str) -> View:
        def build():
            key = self.choose(question)
            if not key:  # no page shares a word with the question: the plain model, stated as such
                return View.text(self.loaded.prompter.context_ids(None), key=("library", "no pages"), document=False)
            self._first = self._first or key[0][0].source
            return Paged.view(self, question)

        view = self._retry(build)
        if not view.pages:
            view.pages = []
        return view

    def _retry(self, work):
        """Run `work`; if a cartridge changed since it was indexed, disagrees with its index
        rows (Stale), or changed while it was read (a CartridgeError from a block), index the
        library again and choose again: the old index's idea of a cartridge is never read."""
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

